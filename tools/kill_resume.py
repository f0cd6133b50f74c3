"""Kill -9 harness: a run killed at random moments and resumed must end bitwise where an
uninterrupted run ends.

    python tools/kill_resume.py --stage {sft,pd_online,pd_offline,minillm,all} --kills 10 --seed 0 --out DIR
        [--steps 30] [--fork]

Per stage it builds a tiny teacher + data in-process (``tests/tiny_assets.py``: a 4-layer, 32-wide
Llama with a byte tokenizer; no downloads), writes a recipe with ``save_every: 1``, runs it once
uninterrupted (the reference), then runs the same recipe into another output_dir as
``python -m minidistill.run recipe.yaml resume=auto`` and SIGKILLs it ``--kills`` times, restarting
with ``resume=auto`` after each kill until it completes. Then it compares, on CPU:

- every tensor of ``<out>/<stage>/final/model.safetensors`` (and of every earlier stage's final/)
  with ``torch.equal`` (bitwise), and
- the metrics of each trained stage's final step (the last ``metrics.jsonl`` row for that step;
  wall-clock keys ``time``, ``step_time_s``, ``tokens_per_s``, ``store_seconds``,
  ``store_tokens_per_s`` excluded) with ``==``, and the final validation metrics.

Stages (each recipe is small enough for kills to land at varied moments):

- ``sft``: 30 steps, grad_accum 2, cosine LR with warm-up, evaluation + best/ export every 10 steps;
- ``pd_online``: PD with wsd LR and the wsd alpha schedule, online teacher, 30 steps;
- ``pd_offline``: a ``pd_store`` stage (many small shards) then PD offline, 30 steps; kills land
  during the store build too;
- ``minillm``: a 5-step SFT stage, then MiniLLM with L_PT on (lm_coef 0.5, kd_ratio 0.5), 30 steps:
  the rollout buffer, its order, the sampling generator and the corpus order are restored; kills
  land between the two stages (SFT final/ written, MiniLLM not started) too.

Kill moments come from a seeded RNG. Each kill has a *mode*:

- ``startup``: a delay drawn uniformly over the reference run's start-up time (imports, model
  loading), or when the first metrics row appears if that comes sooner;
- ``step``: once the trained stage has logged a drawn target step, a uniform delay within one step;
- ``ckpt``: once the target step is reached, poll (about every millisecond) for a ``.tmp-step_*``
  folder and kill as soon as it appears, or a few milliseconds later (``ckpt_late``): inside the
  checkpoint write, the rename, or the pruning of old checkpoints;
- ``store``: during the logit store build, after a drawn number of complete shards;
- ``between``: as soon as an earlier stage's ``final/`` appears (the next stage not started);
- ``export``: as soon as the last stage's ``.tmp-final`` export folder appears.

The order: store/between kills first (with ``--kills`` >= 3), then kills at drawn steps (sorted),
then the export kill (with ``--kills`` >= 2). A kill that arrives after the process already
finished counts as missed (reported; the attempt count then falls short of ``--kills``). Each
attempt records the temp folders the kill left behind (evidence of where it landed) and what the
next attempt reported (checkpoints skipped, the checkpoint resumed from, finished stages skipped).
Everything is CPU and fp32, one thread, so the comparison is bitwise: no tolerance is used.

``--fork`` runs each attempt in a forked copy of this process (``minidistill.run.main``, same code
and the same SIGKILL) instead of a fresh interpreter: much faster, used by ``tests/e2e/test_faults.py``.

The script prints a per-stage summary and writes ``<out>/kill_resume.json``; exit status 0 if every
stage ended equal with the requested number of kills delivered, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

STAGES = ("sft", "pd_online", "pd_offline", "minillm")
WALL_CLOCK = {"time", "step_time_s", "tokens_per_s", "store_seconds", "store_tokens_per_s"}
STEPS = 30


# ---------------------------------------------------------------- recipes


def stage_list(kind: str, steps: int = STEPS) -> list[dict]:
    """The recipe stages for one harness stage; the last one is the trained stage checked."""
    common = {"max_steps": steps, "save_every": 1, "keep_last": 2, "eval_every": max(1, steps // 3)}
    if kind == "sft":
        return [
            dict(
                common, type="sft", name="sft", batch_size=2, grad_accum=2, lr=3e-3, scheduler="cosine", warmup_steps=3
            )
        ]
    pd = dict(
        common,
        type="pd",
        name="pd",
        batch_size=4,
        lr=3e-3,
        scheduler="wsd",
        warmup_steps=3,
        decay_steps=8,
        alpha_schedule="wsd",
        alpha=0.9,
        alpha_min=0.1,
        top_p=0.95,
        top_k=20,
        eval_at_start=True,
    )
    if kind == "pd_online":
        return [pd]
    if kind == "pd_offline":
        return [
            {"type": "pd_store", "name": "logits", "top_p": 0.95, "top_k": 20, "batch_size": 2, "shard_blocks": 4},
            dict(pd, teacher_logits="offline"),
        ]
    if kind == "minillm":
        return [
            {
                "type": "sft",
                "name": "sft0",
                "max_steps": 5,
                "batch_size": 4,
                "lr": 3e-3,
                "scheduler": "constant",
                "eval_every": 0,
                "save_every": 1,
            },
            dict(
                common,
                type="minillm",
                name="minillm",
                lr=1e-3,
                warmup_steps=2,
                num_rollouts=8,
                rollout_batch_size=4,
                batch_size=4,
                ppo_epochs=2,
                max_new_tokens=12,
                lm_coef=0.5,
                kd_ratio=0.5,
                lm_batch_size=2,
                eval_examples=2,
                eval_max_new_tokens=6,
            ),
        ]
    raise ValueError(kind)


def write_recipe(path: Path, output_dir: Path, teacher: Path, data: dict, stages: list[dict]) -> Path:
    import yaml
    from tiny_assets import tiny_recipe

    recipe = tiny_recipe(path.parent, teacher, data, stages, output_dir=str(output_dir), threads=1)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---------------------------------------------------------------- processes


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", COLUMNS="400")
    return e


def launch(recipe: Path, log: Path, resume: bool, fork: bool = False):
    """Start ``python -m minidistill.run recipe [resume=auto]`` with its output in ``log``.

    ``fork``: run ``minidistill.run.main`` in a forked copy of this process instead of a new
    interpreter (the same code and the same SIGKILL, without paying the imports per attempt; used
    by the tests). Both return an object with ``pid``, ``poll()``, ``wait()`` and ``returncode``."""
    args = [str(recipe)] + (["resume=auto"] if resume else [])
    if fork:
        return Forked(args, log)
    cmd = [sys.executable, "-m", "minidistill.run", *args]
    with log.open("w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=str(ROOT))


class Forked:
    """``minidistill.run.main(args)`` in a forked child (stdout/stderr to ``log``), Popen-like."""

    def __init__(self, args: list[str], log: Path):
        import minidistill.run  # noqa: F401  (imported before the fork: the child starts warm)

        self.returncode = None
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                from minidistill.run import main as run_main

                code = run_main(args)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        self.pid = pid

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class MetricsTail:
    """New rows of ``metrics.jsonl`` appended since this attempt started."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.is_file() else 0
        self.rows: list[dict] = []
        self._partial = ""

    def poll(self) -> list[dict]:
        if not self.path.is_file():
            return self.rows
        with self.path.open() as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                try:
                    self.rows.append(json.loads(line))
                except ValueError:
                    pass
        return self.rows

    def max_step(self, stage: str) -> int:
        return max((r["step"] for r in self.poll() if r["stage"] == stage and "loss" in r), default=-1)


def wait_until(proc: subprocess.Popen, cond, timeout: float, interval: float = 0.001) -> bool:
    """Poll ``cond`` until true (True) or the process exits / the timeout passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return bool(cond())
        time.sleep(interval)
    return False


# ---------------------------------------------------------------- comparing


def final_weights_equal(a: Path, b: Path) -> tuple[bool, str]:
    import torch
    from safetensors.torch import load_file

    fa, fb = a / "model.safetensors", b / "model.safetensors"
    if not fb.is_file():
        return False, f"{fb} missing"
    wa, wb = load_file(str(fa)), load_file(str(fb))
    if wa.keys() != wb.keys():
        return False, f"tensor names differ: {sorted(set(wa) ^ set(wb))[:3]}"
    bad = [k for k in wa if wa[k].dtype != wb[k].dtype or not torch.equal(wa[k], wb[k])]
    if bad:
        diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in bad)
        return False, f"{len(bad)}/{len(wa)} tensors differ (max abs diff {diff:.3g}), e.g. {bad[0]}"
    return True, f"{len(wa)} tensors bitwise equal"


def last_rows(out: Path, stage: str, steps: int) -> dict:
    """The last logged training row and the last validation row of ``stage`` at ``steps``."""
    from minidistill.reporting.tracking import read_metrics

    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == stage and r["step"] == steps]
    train = [r for r in rows if "loss" in r]
    valid = [r for r in rows if any(k.startswith("valid/") for k in r)]
    pick = {}
    if train:
        pick["train"] = {k: v for k, v in train[-1].items() if k not in WALL_CLOCK}
    if valid:
        pick["valid"] = {k: v for k, v in valid[-1].items() if k not in WALL_CLOCK}
    return pick


# ---------------------------------------------------------------- one stage


def plan_kills(kind: str, n: int, steps: int, rng: random.Random) -> list[dict]:
    """``n`` kills, in the order they are delivered, each with a mode and a target: stage-specific
    ones first (store build, between stages; only when n >= 3), then kills at drawn steps of the
    trained stage (sorted), then one during the final export (when n >= 2)."""
    extras = [{"mode": "store", "shards": rng.randint(0, 8)} for _ in range(2)] if kind == "pd_offline" else []
    extras += [{"mode": "between"}] if kind == "minillm" else []
    extras = extras[: max(0, n - 2)]
    n_export = 1 if n >= 2 else 0
    modes = ["ckpt", "step", "ckpt_late", "startup"]
    middle = [
        {"mode": modes[i] if i < len(modes) else rng.choice(modes), "target": rng.randint(1, max(1, steps - 1))}
        for i in range(n - len(extras) - n_export)
    ]
    middle.sort(key=lambda k: k["target"])
    return extras + middle + [{"mode": "export"}] * n_export


def run_stage(
    kind: str, kills: int, seed: int, out: Path, teacher: Path, data: dict, *, steps: int = STEPS, fork: bool = False
) -> dict:
    """Reference run, then ``kills`` SIGKILLs and resumes of the same recipe; the comparison."""
    rng = random.Random(f"{seed}/{kind}")
    folder = out / kind
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    stages = stage_list(kind, steps)
    main_stage = stages[-1]["name"]
    trained = [s["name"] for s in stages if s["type"] != "pd_store"]
    ref_out, kill_out = folder / "ref", folder / "killed"
    ref_recipe = write_recipe(folder / "ref.yaml", ref_out, teacher, data, stages)
    kill_recipe = write_recipe(folder / "killed.yaml", kill_out, teacher, data, stages)

    # the reference; measure start-up (until the first training step is logged) and step time
    t0 = time.monotonic()
    proc = launch(ref_recipe, folder / "ref.log", resume=False, fork=fork)
    tail = MetricsTail(ref_out / "metrics.jsonl")
    first = None
    while proc.poll() is None:
        if first is None and any(r["stage"] == stages[0]["name"] for r in tail.poll()):
            first = time.monotonic() - t0
        time.sleep(0.01)
    ref_time = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind}: reference run failed (exit {proc.returncode}); see {folder / 'ref.log'}")
    rows = [r for r in tail.poll() if r["stage"] == main_stage and "step_time_s" in r]
    step_time = sorted(r["step_time_s"] for r in rows)[len(rows) // 2] if rows else 0.05
    startup = first if first is not None else ref_time / 3

    plan = plan_kills(kind, kills, steps, rng)
    attempts = []
    delivered, i, error = 0, 0, None
    while True:
        log = folder / f"attempt_{i:02d}.log"
        kill = plan[delivered] if delivered < len(plan) else None
        tail = MetricsTail(kill_out / "metrics.jsonl")
        t_start, wall_start = time.monotonic(), time.time()

        def new(paths) -> bool:
            """Some of ``paths`` exists and was made by this attempt (not left by a killed one)."""
            for p in paths:
                try:
                    if p.stat().st_mtime >= wall_start:
                        return True
                except OSError:
                    pass
            return False

        proc = launch(kill_recipe, log, resume=True, fork=fork)
        record = {"attempt": i, "mode": kill["mode"] if kill else "complete"}
        if kill is not None:
            mode = kill["mode"]
            ok = True
            ckpts = kill_out / main_stage / "checkpoints"
            if mode == "startup":
                delay = rng.uniform(0.0, startup)
                record["delay_s"] = round(delay, 3)
                # or as soon as training starts, if start-up is quicker than measured (a loaded machine)
                ok = wait_until(
                    proc, lambda: time.monotonic() - t_start >= delay or bool(tail.poll()), delay + 600, interval=0.005
                )
            elif mode in ("step", "ckpt", "ckpt_late"):
                target = kill["target"]
                record["target_step"] = target
                ok = wait_until(
                    proc, lambda: tail.max_step(main_stage) >= target - 1 if target > 1 else True, 600, 0.005
                )
                if ok and mode == "step":
                    delay = rng.uniform(0.0, step_time)
                    record["delay_s"] = round(delay, 4)
                    time.sleep(delay)
                elif ok:
                    ok = wait_until(proc, lambda: new(ckpts.glob(".tmp-step_*")), 600)
                    if ok and mode == "ckpt_late":
                        delay = rng.uniform(0.0, 0.03)
                        record["delay_s"] = round(delay, 4)
                        time.sleep(delay)
            elif mode == "store":
                store = kill_out / stages[0]["name"]
                n = len(list(store.glob("shard_*.json"))) + kill["shards"]  # shards complete before the kill
                record["after_shards"] = n
                ok = wait_until(
                    proc, lambda: len(list(store.glob("shard_*.json"))) >= n and (store / "plan.json").is_file(), 600
                )
                if ok:
                    time.sleep(rng.uniform(0.0, 0.05))
            elif mode == "between":
                first_final = kill_out / stages[0]["name"] / "final"
                ok = wait_until(proc, lambda: (first_final / "manifest.json").is_file(), 600)
            elif mode == "export":
                tmp = kill_out / main_stage / ".tmp-final"
                final = kill_out / main_stage / "final"
                ok = wait_until(proc, lambda: new([tmp, final]), 600)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                record["killed"] = True
                record["at_s"] = round(time.monotonic() - t_start, 3)
                # evidence of where it landed: temp folders left behind by the kill
                record["left_behind"] = sorted(str(p.relative_to(kill_out)) for p in kill_out.glob("**/.tmp-*"))
                delivered += 1
            else:
                record["killed"] = False  # finished (or failed) before the kill
                record["wait_ok"] = ok
        else:
            proc.wait()
        record["exit"] = proc.returncode
        text = log.read_text(errors="replace")
        record["resumed_from"] = [
            line.split(" from ", 1)[1].strip() for line in text.splitlines() if line.startswith("resumed stage")
        ]
        record["skipped_checkpoints"] = [
            line.strip() for line in text.splitlines() if "skipping" in line and "checkpoint" in line
        ]
        record["stages_skipped"] = [
            line.split("'")[1] for line in text.splitlines() if "final/ exists, skipping" in line
        ]
        attempts.append(record)
        i += 1
        if not record.get("killed"):
            if proc.returncode != 0:
                error = f"attempt {i - 1} exited {proc.returncode}; see {log}"
            break

    equal, detail = error is None, {"error": error} if error else {}
    for name in [s["name"] for s in stages if s["type"] != "pd_store"]:
        ok, why = final_weights_equal(ref_out / name / "final", kill_out / name / "final")
        detail[f"{name}/final"] = why
        equal &= ok
    for name in trained:
        n_steps = next(s["max_steps"] for s in stages if s["name"] == name)
        ra, rb = last_rows(ref_out, name, n_steps), last_rows(kill_out, name, n_steps)
        same = bool(ra) and ra == rb
        if not same:
            diff = {
                part: {
                    k: (ra.get(part, {}).get(k), rb.get(part, {}).get(k))
                    for k in set(ra.get(part, {})) | set(rb.get(part, {}))
                    if ra.get(part, {}).get(k) != rb.get(part, {}).get(k)
                }
                for part in ("train", "valid")
            }
            detail[f"{name}/metrics"] = f"final-step metrics differ: {diff}"
        else:
            detail[f"{name}/metrics"] = (
                f"final-step metrics equal ({len(ra.get('train', {}))} train keys, {len(ra.get('valid', {}))} valid keys)"
            )
        equal &= same
    return {
        "stage": kind,
        "kills": delivered,
        "kills_requested": kills,
        "restarts": len(attempts) - 1,
        "resumed_from_checkpoint": sum(bool(a["resumed_from"]) for a in attempts),
        "equal": equal,
        "detail": detail,
        "reference_seconds": round(ref_time, 1),
        "startup_seconds": round(startup, 2),
        "step_seconds": round(step_time, 4),
        "attempts": attempts,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=STAGES + ("all",), default="all")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of the trained stage")
    p.add_argument(
        "--fork",
        action="store_true",
        help="run attempts in forked copies of this process "
        "(faster; default: a new `python -m minidistill.run` per attempt)",
    )
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tiny_assets import save_tiny_teacher, write_tiny_data

    assets = out / "assets"
    assets.mkdir(exist_ok=True)
    teacher = assets / "teacher"
    if not (teacher / "config.json").is_file():
        save_tiny_teacher(teacher)
    data = write_tiny_data(assets)
    results = []
    for kind in STAGES if args.stage == "all" else (args.stage,):
        t0 = time.monotonic()
        res = run_stage(kind, args.kills, args.seed, out, teacher, data, steps=args.steps, fork=args.fork)
        res["seconds"] = round(time.monotonic() - t0, 1)
        results.append(res)
        modes = {}
        for a in res["attempts"]:
            if a.get("killed"):
                modes[a["mode"]] = modes.get(a["mode"], 0) + 1
        print(
            f"{kind:11s} kills {res['kills']:2d}/{res['kills_requested']}  restarts {res['restarts']:2d}  "
            f"resumed from a checkpoint {res['resumed_from_checkpoint']:2d}  equal {'yes' if res['equal'] else 'NO'}  "
            f"({res['seconds']:.0f} s; modes {modes})",
            flush=True,
        )
        for k, v in res["detail"].items():
            print(f"    {k}: {v}", flush=True)
    summary = {
        "seed": args.seed,
        "kills": args.kills,
        "all_equal": all(r["equal"] for r in results),
        "all_kills_delivered": all(r["kills"] >= r["kills_requested"] for r in results),
        "stages": results,
    }
    (out / "kill_resume.json").write_text(json.dumps(summary, indent=1))
    print(f"all equal: {'yes' if summary['all_equal'] else 'NO'}; JSON: {out / 'kill_resume.json'}")
    return 0 if summary["all_equal"] and summary["all_kills_delivered"] else 1


if __name__ == "__main__":
    sys.exit(main())
