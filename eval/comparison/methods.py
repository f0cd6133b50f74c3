"""Our methods through their recipes: the training prompts, recipes/compare/*.yaml patched from the plan, and running them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from minidistill.errors import UserError
from minidistill.training.checkpoint import write_json_atomic, write_text_atomic

from .plan import ABLATIONS, DEVICE, RECIPE_OF, RECIPES, Plan, method_steps, stage_seed, warmup

# ---- training data -----------------------------------------------------------------------------


def _key(ex) -> tuple[str, str]:
    return (" ".join(ex.instruction.split()).lower(), " ".join(ex.input.split()).lower())


def prepare_train_file(plan: Plan) -> tuple[Plan, Path, dict]:
    """<out>/data/train.jsonl: the training instructions minus test items, the first train_examples.
    Returns the plan with ``train_examples`` as used (auto: at most the items there are), the file
    and its description."""
    from minidistill.data import load_instructions

    examples = load_instructions(plan.train)
    test_keys = {_key(ex) for path in plan.tests.values() for ex in load_instructions(path)}
    kept = [ex for ex in examples if _key(ex) not in test_keys]
    n_overlap = len(examples) - len(kept)
    if plan.train_examples_auto:  # steps x batch, or every item when there are fewer (then > 1 epoch)
        plan = dataclasses.replace(plan, train_examples=min(plan.train_examples, len(kept)))
    if len(kept) < plan.train_examples:
        raise UserError(
            f"--train-examples: {plan.train_examples} requested but {plan.train} has only "
            f"{len(kept)} items that are not test items"
        )
    kept = kept[: plan.train_examples]
    text = "".join(
        json.dumps({"instruction": ex.instruction, "input": ex.input, "output": ex.response}, ensure_ascii=False) + "\n"
        for ex in kept
    )
    path = Path(plan.out) / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    return (
        plan,
        path,
        {
            "file": str(path),
            "source": plan.train,
            "n_examples": len(kept),
            "n_dropped_test_overlap": n_overlap,
        },
    )


# ---- our methods via recipes --------------------------------------------------------------------


def _base(raw: dict, plan: Plan, out: Path, seed: int | None = None) -> dict:
    raw.update(
        output_dir=str(out),
        seed=plan.seed if seed is None else seed,
        precision=plan.precision,
        device=DEVICE,
        threads=plan.threads,
        resume="auto",
        overwrite=plan.overwrite,
    )
    raw["teacher"] = {"model": plan.teacher}
    return raw


def start_recipe(plan: Plan):
    from minidistill.config import parse_recipe, read_yaml

    path = RECIPES / "start.yaml"
    raw = _base(read_yaml(path), plan, Path(plan.out) / "start")
    steps = plan.start_steps
    raw["student"] = {"init": "prune", "layer_stride": plan.layer_stride}
    raw["data"].update(
        corpus=plan.corpus,
        block_len=plan.block_len,
        valid_blocks=plan.valid_blocks,
        max_blocks=steps * raw["stages"][0]["batch_size"],
    )
    raw["stages"][0].update(max_steps=steps, warmup_steps=max(1, steps // 10), decay_steps=max(1, steps // 5))
    return parse_recipe(raw, str(path))


def method_recipe(method: str, plan: Plan, init_final: Path, train_file: Path):
    """The method's recipe (an ablation: minillm.yaml plus its switch), initialised from ``init_final``."""
    from minidistill.config import parse_recipe, read_yaml

    path = RECIPES / f"{RECIPE_OF.get(method, method)}.yaml"
    raw = _base(read_yaml(path), plan, Path(plan.out) / method, stage_seed(method, plan))
    raw["student"] = {"init": "pretrained", "model": str(init_final)}
    d = raw["data"]
    d.pop("max_examples", None)  # the train file holds exactly the training prompts
    d.update(
        train=str(train_file),
        template=plan.template,
        max_prompt_length=plan.max_prompt_length,
        max_length=plan.max_length,
    )
    if "corpus" in d:
        d.update(corpus=plan.lpt_corpus, block_len=plan.block_len)
    st = raw["stages"][0]
    steps = method_steps(method, plan)
    st.update(max_steps=steps, batch_size=plan.batch_size, grad_accum=1, warmup_steps=warmup(steps))
    ablation = dict(ABLATIONS.get(method, {}))
    rollouts_x = ablation.pop("rollouts_x", 1)  # not a recipe key: a multiple of --gen-tokens
    st.update(ablation)
    if plan.lr is not None:
        st["lr"] = plan.lr
    if "max_new_tokens" in st:
        st["max_new_tokens"] = plan.gen_tokens * rollouts_x
    if st["type"] == "minillm":
        st["num_rollouts"] = max(st["num_rollouts"], plan.batch_size)
        if plan.tiny:
            st.update(num_rollouts=plan.batch_size, rollout_batch_size=plan.batch_size, lm_batch_size=2)
    return parse_recipe(raw, str(path))


def run_our_recipe(recipe, label: str) -> Path:
    """Run (or reuse, resume: auto) a recipe; returns its last stage's final/ folder."""
    from minidistill.run import run_recipe

    try:
        finals = run_recipe(recipe)
    except UserError as e:
        raise UserError(f"{label}: {e} (rerun with --overwrite or another --out)") from None
    return Path(finals[recipe.stages[-1].name])


def fingerprint(folder: Path) -> str:
    """Changes whenever the model folder is rewritten (file names, sizes, modification times)."""
    parts = [
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(Path(folder).iterdir()) if p.is_file()
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def timed(final: Path, train, overwrite: bool) -> tuple[Path, dict]:
    """Run ``train()``; the wall time is saved beside ``final`` so a rerun that reuses it reports it too."""
    from minidistill.training.checkpoint import is_complete

    record = final.parent / "compare_seconds.json"
    existed = not overwrite and is_complete(final)[0]
    t0 = time.perf_counter()
    folder = train()
    seconds = round(time.perf_counter() - t0, 1)
    if existed:  # trained before: its recorded time, if this script trained it
        saved = json.loads(record.read_text()) if record.is_file() else {}
        known = saved.get("fingerprint") == fingerprint(folder)
        return folder, {"final": str(folder), "seconds": saved["seconds"] if known else None, "reused": True}
    write_json_atomic(record, {"seconds": seconds, "fingerprint": fingerprint(folder)})
    return folder, {"final": str(folder), "seconds": seconds, "reused": False}
