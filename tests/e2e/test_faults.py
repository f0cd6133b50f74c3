"""Reliability: exact resume after SIGKILL, graceful stop on SIGTERM/SIGINT, corrupt or incomplete
checkpoints, non-finite losses and gradients.

The kill tests drive ``tools/kill_resume.py`` (its docstring describes the kill moments); the
default suite runs it with attempts in forked children (same code and SIGKILL, no interpreter
start-up per attempt), the slow test with real ``python -m minidistill.run`` subprocesses.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minidistill.config import load_recipe
from minidistill.reporting.tracking import read_metrics
from minidistill.run import main, run_recipe
from minidistill.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import kill_resume  # noqa: E402

pytestmark = pytest.mark.e2e  # end to end: `./test.sh -m 'not slow and not e2e'` skips it


@pytest.fixture(autouse=True)
def _no_report(monkeypatch):
    """The end-of-run report (matplotlib) is most of a tiny run's time and not what is tested here;
    forked attempts inherit the patch."""
    from minidistill.reporting import report

    monkeypatch.setattr(report, "write_report", lambda out_dir: "(not written in tests)")


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    bad = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def sft_stage(**kw) -> dict:
    stage = {
        "type": "sft",
        "name": "sft",
        "max_steps": 4,
        "batch_size": 4,
        "lr": 3e-3,
        "scheduler": "cosine",
        "warmup_steps": 1,
        "eval_every": 0,
        "save_every": 1,
    }
    stage.update(kw)
    return stage


def train_rows(out: Path, stage: str = "sft") -> dict[int, dict]:
    """The last logged training row per step."""
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == stage and "loss" in r}


# ---------------------------------------------------------------- kill -9 and resume


def _kill_resume(kind: str, kills: int, steps: int, tmp_path, tiny_dir, tiny_data, fork: bool) -> dict:
    res = kill_resume.run_stage(kind, kills, 0, tmp_path, tiny_dir, tiny_data, steps=steps, fork=fork)
    assert res["kills"] == kills, res["attempts"]
    assert res["equal"], res["detail"]
    assert res["attempts"][-1]["exit"] == 0
    return res


def test_kill_resume_sft(tmp_path, tiny_dir, tiny_data):
    res = _kill_resume("sft", 2, 8, tmp_path, tiny_dir, tiny_data, fork=True)
    assert [a["mode"] for a in res["attempts"]] == ["ckpt", "export", "complete"]


def test_kill_resume_minillm(tmp_path, tiny_dir, tiny_data):
    """MiniLLM with L_PT: rollout buffer, its order, the sampling generator, the corpus order."""
    res = _kill_resume("minillm", 2, 6, tmp_path, tiny_dir, tiny_data, fork=True)
    assert res["attempts"][-1]["stages_skipped"] == ["sft0"]  # the SFT stage's final/ was reused


@pytest.mark.slow
@pytest.mark.parametrize("kind", kill_resume.STAGES)
def test_kill_resume_every_stage_subprocess(kind, tmp_path, tiny_dir, tiny_data):
    """Real ``python -m minidistill.run`` processes; 3 kills: one in the store build (pd_offline) or
    between the stages (minillm), one at a drawn step, one in the final export."""
    _kill_resume(kind, 3, 12, tmp_path, tiny_dir, tiny_data, fork=False)


# ---------------------------------------------------------------- graceful stop


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resumes_exactly(sig, recipe_file, tmp_path):
    """A signal after the first logged step: exit 3 naming a complete checkpoint (save_every is 0:
    only the signal writes it), from which resume ends where an uninterrupted run ends."""
    stage = sft_stage(max_steps=40, save_every=0, batch_size=2)
    ref = recipe_file([stage], name="ref.yaml", output_dir=str(tmp_path / "ref"), threads=1)
    assert main([str(ref)]) == 0
    path = recipe_file([stage], name="run.yaml", output_dir=str(tmp_path / "run"), threads=1)
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    if sig == signal.SIGTERM:  # a real interpreter, as from the command line
        proc = kill_resume.launch(path, log, resume=False)
    else:
        proc = kill_resume.launch(path, log, resume=False, fork=True)
    tail = kill_resume.MetricsTail(out / "metrics.jsonl")
    assert kill_resume.wait_until(proc, lambda: tail.max_step("sft") >= 1, 300, 0.002), log.read_text()
    os.kill(proc.pid, sig)
    assert proc.wait() == 3, log.read_text()
    text = log.read_text()
    stopped = [line for line in text.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1, text
    folder = Path(stopped[0].split("checkpoint ", 1)[1].split(";")[0])
    assert folder.parent == out / "sft" / "checkpoints" and folder.name.startswith("step_")
    assert ckpt.is_complete(folder) == (True, "")
    step = int(folder.name.split("_")[1])
    assert 1 <= step < 40 and not (out / "sft" / "final").exists()
    assert main([str(path), "resume=auto"]) == 0
    assert_same_weights(tmp_path / "ref" / "sft" / "final", out / "sft" / "final")
    assert train_rows(out)[40]["loss"] == train_rows(tmp_path / "ref")[40]["loss"]


# ---------------------------------------------------------------- corrupt and incomplete checkpoints


def _crash_after(step: int, monkeypatch):
    """Make the loop raise KeyboardInterrupt right after checkpoint ``step`` is written."""
    import minidistill.training.loop as loop

    original = ckpt.save_checkpoint

    def save(*args, **kwargs):
        folder = original(*args, **kwargs)
        if folder.name == f"step_{step:07d}":
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(loop.ckpt, "save_checkpoint", save)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _scramble_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00" * 32  # inside the safetensors JSON header: unreadable, same size
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    # name: (what to do to checkpoint step 3, the reason the one report line must give, folder reported)
    "truncated_weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors has", "step_0000003"),
    "missing_file": (lambda d: (d / "optimizer.pt").unlink(), "missing optimizer.pt", "step_0000003"),
    "corrupt_manifest": (
        lambda d: (d / "manifest.json").write_text('{"files": [1, 2'),
        "manifest.json is corrupt",
        "step_0000003",
    ),
    "no_manifest": (lambda d: (d / "manifest.json").unlink(), "no manifest.json", "step_0000003"),
    "unreadable_same_size": (lambda d: _scramble_same_size(d / "model.safetensors"), "unreadable", "step_0000003"),
    "tmp_leftover": (lambda d: d.rename(d.parent / ".tmp-step_0000003"), "temp folder", ".tmp-step_0000003"),
}


def test_corrupt_checkpoints_fall_back_to_the_previous_one(recipe_file, tmp_path, monkeypatch, capsys):
    """Each corruption of the newest checkpoint is reported in one line naming the folder and the
    reason, the previous complete checkpoint is used, and the run ends bitwise where an
    uninterrupted one ends. With every checkpoint unusable the stage starts over from step 0."""
    stage = sft_stage(keep_last=5)
    ref = recipe_file([stage], name="ref.yaml", output_dir=str(tmp_path / "ref"), threads=1)
    assert main([str(ref)]) == 0
    path = recipe_file([stage], name="run.yaml", output_dir=str(tmp_path / "run"), threads=1)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_after(3, m)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(load_recipe(path))
    ckpts = out / "sft" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000001", "step_0000002", "step_0000003"]
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)

    cases = dict(CORRUPTIONS, everything_corrupt=None)
    for name, case in cases.items():
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        if case is None:
            for d in ckpts.iterdir():
                (d / "manifest.json").unlink()
        else:
            case[0](ckpts / "step_0000003")
        capsys.readouterr()
        assert main([str(path), "resume=auto"]) == 0, name
        err = capsys.readouterr().err.splitlines()
        reports = [line for line in err if "skipping" in line]
        resumed = [line for line in err if line.startswith("resumed stage")]
        if case is None:
            assert len(reports) == 3 and not resumed, (name, err)
            assert any(line.startswith(f"no usable checkpoint under {ckpts}") and "step 0" in line for line in err), err
        else:
            assert len(reports) == 1, (name, err)
            assert str(ckpts / case[2]) in reports[0] and case[1] in reports[0], (name, reports)
            assert resumed == [f"resumed stage 'sft' from {ckpts / 'step_0000002'} (step 2)"], (name, err)
        assert_same_weights(tmp_path / "ref" / "sft" / "final", out / "sft" / "final")
        # the final checkpoints are complete; nothing stale or temporary is left
        assert all(ckpt.is_complete(d)[0] for d in ckpts.iterdir()), (name, sorted(ckpts.iterdir()))


def test_keep_last_1_keeps_the_good_checkpoint_when_the_newest_write_fails(recipe_file, tmp_path, monkeypatch, capsys):
    stage = sft_stage(keep_last=1)
    ref = recipe_file([stage], name="ref.yaml", output_dir=str(tmp_path / "ref"), threads=1)
    assert main([str(ref)]) == 0
    path = recipe_file([stage], name="run.yaml", output_dir=str(tmp_path / "run"), threads=1)
    ckpts = tmp_path / "run" / "sft" / "checkpoints"
    real_save_file = ckpt.save_file

    def failing_save_file(tensors, filename, *a, **kw):
        real_save_file(tensors, filename, *a, **kw)
        if ".tmp-step_0000003" in filename:  # the disk fills up half-way through checkpoint 3
            _truncate(Path(filename))
            raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_file", failing_save_file)
        with pytest.raises(OSError):
            run_recipe(load_recipe(path))
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step_0000003", "step_0000002"]
    assert ckpt.is_complete(ckpts / "step_0000002")[0]
    capsys.readouterr()
    assert main([str(path), "resume=auto"]) == 0
    err = capsys.readouterr().err
    assert f"resumed stage 'sft' from {ckpts / 'step_0000002'} (step 2)" in err
    assert_same_weights(tmp_path / "ref" / "sft" / "final", tmp_path / "run" / "sft" / "final")
    assert [p.name for p in ckpts.iterdir()] == ["step_0000003"]  # max_steps 4: the last step is not checkpointed


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    d = root / f"step_{step:07d}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x" * 10)
    if complete:
        ckpt._write_manifest(d)
    return d


def test_prune_keeps_the_newest_complete_and_drops_stale_ones(tmp_path):
    root = tmp_path / "ckpts"
    good = _fake_checkpoint(root, 1)
    _fake_checkpoint(root, 3, complete=False)  # newest, incomplete
    ckpt.prune(root, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == [good.name]  # the only good one survives
    # after resuming from step 1 (step 2 unusable) and writing step 2 again: newer leftovers are stale
    _fake_checkpoint(root, 2)
    _fake_checkpoint(root, 4)
    (root / ".tmp-step_0000005").mkdir()
    ckpt.prune(root, keep_last=1, current=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002"]
    _fake_checkpoint(root, 3)
    ckpt.prune(root, keep_last=2, current=3)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000003"]


def test_resume_into_a_folder_left_before_recipe_yaml(recipe_file, tmp_path):
    """A kill between creating output_dir and writing recipe.yaml leaves only our probe file."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".write-test").write_text("")
    (out / ".tmp-recipe.yaml.123").write_text("output_dir: x")
    path = recipe_file([sft_stage(max_steps=1, save_every=0)], output_dir=str(out), threads=1)
    assert main([str(path), "resume=auto"]) == 0
    (out / "stranger.txt").write_text("")
    other = tmp_path / "other"
    other.mkdir()
    (other / "stranger.txt").write_text("")
    path = recipe_file([sft_stage(max_steps=1, save_every=0)], name="other.yaml", output_dir=str(other), threads=1)
    assert main([str(path), "resume=auto"]) == 2


# ---------------------------------------------------------------- non-finite losses and gradients


def _poison(monkeypatch, bad_steps: set[int], how: str, seen: dict):
    """Wrap the SFT loss: on the optimizer steps in ``bad_steps`` (1-based; grad_accum 1) the loss
    is NaN (``how='loss'``) or its gradient is inf (``how='grad'``, finite loss). Records a copy of
    the weights at every call, so a test can see what a skipped step did to them."""
    from minidistill.stages import sft

    real = sft.sft_loss
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        step = calls["n"]
        seen[step] = {k: v.detach().clone() for k, v in model.named_parameters()}
        value, metrics = real(model, batch)
        if step in bad_steps:
            if how == "loss":
                value = value * float("nan")
            else:
                value = _inf_grad(value)
        return value, metrics

    monkeypatch.setattr(sft, "sft_loss", loss)


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _inf_grad(value: torch.Tensor) -> torch.Tensor:
    return _InfGrad.apply(value)


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_nan_skip_leaves_weights_and_counts(how, recipe_file, tmp_path, monkeypatch):
    """nan_policy skip: a bad step changes no weight, is counted in skipped_steps, and a good step
    in between resets the bad-in-a-row count (max_bad_steps 2, bad steps 2 and 4: no stop)."""
    seen: dict = {}
    _poison(monkeypatch, {2, 4}, how, seen)
    path = recipe_file([sft_stage(max_steps=6, save_every=0, nan_policy="skip", max_bad_steps=2)], threads=1)
    assert main([str(path)]) == 0
    for bad in (2, 4):  # the weights before the bad step's loss == before the next step's
        assert all(torch.equal(seen[bad][k], seen[bad + 1][k]) for k in seen[bad]), bad
    assert not all(torch.equal(seen[3][k], seen[4][k]) for k in seen[3])  # a good step does change them
    rows = train_rows(tmp_path / "run")
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 1, 1, 2, 2, 2]
    if how == "loss":
        assert rows[2]["loss"] == "nan" and math.isfinite(rows[3]["loss"])
    else:
        assert math.isfinite(rows[2]["loss"]) and rows[2]["grad_norm"] in ("inf", "nan")


@pytest.mark.parametrize("policy,bad,max_bad,stop_step", [("stop", {2}, 5, 2), ("skip", {2, 3, 4, 5, 6}, 3, 4)])
def test_nan_stop_is_a_one_line_user_error(policy, bad, max_bad, stop_step, recipe_file, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, bad, "loss", {})
    path = recipe_file([sft_stage(max_steps=6, save_every=0, nan_policy=policy, max_bad_steps=max_bad)], threads=1)
    capsys.readouterr()
    assert main([str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    n_bad = 1 if policy == "stop" else max_bad
    assert len(err) == 1 and f"stage 'sft' step {stop_step}:" in err[0] and "non-finite" in err[0], err
    assert f"{n_bad} bad step(s) in a row" in err[0] and f"nan_policy={policy}" in err[0], err
    assert not (tmp_path / "run" / "sft" / "final").exists()
