"""EOS rate and mean length of every model of a comparison run on the items one model was scored on
(the ablations are scored on the first --control-examples items only, so their EOS rates are
compared with the others' on those items), from the saved generations (every seed).

    python eval/eos_on_items.py runs/compare/main --items minillm_a0 --test dolly_test [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from minidistill.errors import UserError  # noqa: E402
from minidistill.training.checkpoint import write_json_atomic  # noqa: E402


def eos_on_items(out: Path, items_of: str, test: str) -> dict[str, dict]:
    """{model: {eos_rate, mean_length, n_samples}} over the generations of the items ``items_of`` has."""
    ev = Path(out) / "eval"
    ref = ev / items_of / "summary.json"
    if not ref.is_file():
        raise UserError(f"--items: {ref} not found (a model evaluated in {out} was expected)")
    summary = json.loads(ref.read_text())
    if test not in summary["item_scores"]:
        raise UserError(f"--test: {items_of} was not scored on '{test}' (has {', '.join(summary['item_scores'])})")
    limit = summary["settings"]["max_new_tokens"]
    items = {int(i) for i in summary["item_scores"][test]}
    rows = {}
    for path in sorted(ev.glob(f"*/{test}.generations.jsonl")):
        gens = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        sub = [g for g in gens if g["index"] in items]
        if not sub:
            continue
        lengths = [len(g["generation_ids"]) for g in sub]  # the response without its EOS
        rows[path.parent.name] = {
            "eos_rate": sum(n < limit for n in lengths) / len(sub),
            "mean_length": sum(lengths) / len(sub),
            "n_samples": len(sub),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a comparison's --out folder (with eval/<model>/<test>.generations.jsonl)")
    p.add_argument("--items", required=True, help="the model whose scored items are used")
    p.add_argument("--test", default="dolly_test")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    try:
        rows = eos_on_items(Path(args.out), args.items, args.test)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"| model | samples | EOS rate | mean length |  ({args.test}, the items of {args.items})")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['n_samples']} | {r['eos_rate']:.3f} | {r['mean_length']:.1f} |")
    if args.json:
        write_json_atomic(Path(args.json), {"items_of": args.items, "test": args.test, "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
