"""Put re-trained models beside a published comparison, reusing every other row (issue 24).

    python eval/compare_merge.py --published docs/compare/main --rerun docs/compare/eos_fix \
        --take minillm --rename minillm=minillm_const --check teacher,sft --out docs/compare/merged

--rerun is a comparison folder (--out or --publish of eval/compare.py) that rebuilt the same teacher
and start and re-trained the --take models. --check names models both runs evaluated whose per-item
scores must be identical (the proof that the re-run rebuilt the same models); a difference refuses
the merge. --rename gives a published model another name (here: the old MiniLLM row, trained with a
constant a = 0.2, becomes the ablation minillm_const). Writes results.json and table.md to --out,
atomically; the statistics (item-bootstrap CIs, paired differences) are recomputed over the merge.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # minidistill (the repo root) and the comparison package (eval/)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from comparison.merge import merge  # noqa: E402
from comparison.report import write_results  # noqa: E402

from minidistill.errors import UserError  # noqa: E402


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--published", required=True, help="the published comparison folder (results.json + summaries)")
    p.add_argument("--rerun", required=True, help="the re-run's comparison folder")
    p.add_argument("--take", required=True, help="comma-separated models taken from the re-run")
    p.add_argument("--rename", default="", help="OLD=NEW,...: published models shown under another name")
    p.add_argument("--check", default="teacher,sft", help="models whose per-item scores must be identical in both")
    p.add_argument("--out", required=True, help="folder for the merged results.json and table.md")
    args = p.parse_args(argv)
    try:
        rename = {}
        for item in _names(args.rename):
            old, sep, new = item.partition("=")
            if not sep or not old or not new:
                raise UserError(f"--rename: expected OLD=NEW, got '{item}'")
            rename[old] = new
        results, table = merge(Path(args.published), Path(args.rerun), _names(args.take), rename, _names(args.check))
        write_results(Path(args.out), results, table)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
