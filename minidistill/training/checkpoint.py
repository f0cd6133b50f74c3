"""Checkpoints: atomic, verifiable, loadable without pickle.

A checkpoint is a folder ``<stage_dir>/checkpoints/step_0000100/`` holding
- ``model.safetensors``   every student weight (LoRA adapters included) by parameter name,
- ``optimizer.pt``, ``scheduler.pt``, ``source.pt`` (data position / rollout buffer),
  ``rng_<rank>.pt``         all loaded with ``torch.load(weights_only=True)``,
- ``state.json``          step, best metric, counters,
- ``manifest.json``       written last: every file's size; a folder without it, or whose files
  do not match it, is incomplete and skipped on resume (with a message).
It is written to ``.tmp-step_...`` and renamed into place, so it is never visible half-written.
Resume (``load_latest``) takes the newest complete checkpoint whose files can all be read, reporting
each one it skips in one line; with none usable the stage starts from step 0. ``prune`` never
deletes the checkpoint just written, so ``keep_last: 1`` always leaves one good checkpoint.
Final models go out as Hugging Face folders the same way (temp, then rename).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minidistill.errors import UserError


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": np_state[2],
        "numpy_has_gauss": np_state[3],
        "numpy_gauss": np_state[4],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    gauss = None if py[-1] == -1 else py[-1]
    random.setstate((state["python_version"], tuple(int(x) for x in py[:-1]), gauss))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_manifest(folder: Path) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({"files": files}, indent=1))


def is_complete(folder: Path) -> tuple[bool, str]:
    """(ok, reason): the manifest exists and every listed file has the recorded size."""
    man = folder / "manifest.json"
    if not man.is_file():
        return False, "no manifest.json (interrupted while writing)"
    try:
        files = json.loads(man.read_text())["files"]
        files = {str(k): int(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False, "manifest.json is corrupt"
    for name, size in files.items():
        p = folder / name
        if not p.is_file():
            return False, f"missing {name}"
        if p.stat().st_size != size:
            return False, f"{name} has {p.stat().st_size} bytes, expected {size}"
    return True, ""


def save_checkpoint(
    acc, root: Path, step: int, model, optimizer, scheduler, source_state: dict, state: dict, keep_last: int
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically (all processes call this)."""
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    weights = acc.get_state_dict(model)  # gathers under FSDP / DeepSpeed
    if acc.is_main_process:
        save_file(_dedupe(weights), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    torch.save(source_state, tmp / f"source_{acc.process_index}.pt")
    torch.save(_rng_state(), tmp / f"rng_{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(root, keep_last, current=step)
    acc.wait_for_everyone()
    return final


def _dedupe(weights: dict) -> dict:
    """Drop tied duplicates (e.g. lm_head == embed_tokens): safetensors stores each storage once."""
    out, seen = {}, set()
    for k, v in weights.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    return out


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_complete(root: Path, report=print) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first; incomplete ones (and temp folders left by
    an interrupted write) are reported, one line each, and skipped."""
    out = []
    root = Path(root)
    if report is not None:
        for d in sorted(root.glob(".tmp-step_*")):
            report(f"skipping incomplete checkpoint {d}: temp folder of an interrupted write")
    for d in sorted(root.glob("step_*"), key=_step_of):
        ok, why = is_complete(d)
        if ok:
            out.append(d)
        elif report is not None:
            report(f"skipping incomplete checkpoint {d}: {why}")
    return out


def prune(root: Path, keep_last: int, current: int | None = None) -> None:
    """After checkpoint ``current`` was written: delete all but the newest ``keep_last`` complete
    checkpoints up to it, incomplete ones, newer ones (left by an earlier attempt that resume did
    not use, so stale) and temp folders. The checkpoint just written is always kept."""
    root = Path(root)
    stale = [d for d in root.glob("step_*") if current is not None and _step_of(d) > current]
    stale += [d for d in root.glob("step_*") if d not in stale and not is_complete(d)[0]]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    good = list_complete(root, report=None)
    for d in good[: max(0, len(good) - max(1, keep_last))]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".tmp-step_*"):
        shutil.rmtree(d, ignore_errors=True)


def read_checkpoint(acc, folder: Path) -> dict:
    """Every file of checkpoint ``folder`` this process needs, read into memory (raises if one is
    unreadable); nothing is applied yet, so a failed read leaves the run untouched."""
    folder = Path(folder)
    return {
        "weights": load_file(str(folder / "model.safetensors")),
        "optimizer": torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"),
        "scheduler": torch.load(folder / "scheduler.pt", weights_only=True),
        "rng": torch.load(folder / f"rng_{acc.process_index}.pt", weights_only=True),
        "source": torch.load(folder / f"source_{acc.process_index}.pt", weights_only=True),
        "state": json.loads((folder / "state.json").read_text()),
    }


def apply_checkpoint(acc, folder: Path, loaded: dict, model, optimizer, scheduler) -> tuple[dict, dict]:
    """Restore model/optimizer/scheduler/RNG from ``read_checkpoint``; returns (state, source_state)."""
    target = acc.unwrap_model(model)
    missing, unexpected = target.load_state_dict(loaded["weights"], strict=False)
    if unexpected or [k for k in missing if k in dict(target.named_parameters())]:
        raise UserError(
            f"{folder}: checkpoint does not match the student (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    _set_rng_state(loaded["rng"])
    return loaded["state"], loaded["source"]


def load_checkpoint(acc, folder: Path, model, optimizer, scheduler) -> tuple[dict, dict]:
    """Restore model/optimizer/scheduler/RNG from ``folder``; returns (state, source_state)."""
    return apply_checkpoint(acc, folder, read_checkpoint(acc, folder), model, optimizer, scheduler)


def load_latest(acc, root: Path, model, optimizer, scheduler, report=print) -> tuple[Path, dict, dict] | None:
    """Resume from the newest usable checkpoint under ``root``: (folder, state, source_state), or
    None (nothing usable: the stage starts from step 0, said in one line if anything was skipped).

    Incomplete checkpoints (no/corrupt manifest, missing or wrong-size files, temp folders) are
    reported and skipped by ``list_complete``; a complete one whose files cannot be read is
    reported and the previous one is tried. All processes take the same decision."""
    root = Path(root)
    skipped = any(root.glob(".tmp-step_*")) or any(root.glob("step_*"))
    for folder in reversed(list_complete(root, report=report)):
        try:
            loaded, why = read_checkpoint(acc, folder), ""
        except Exception as e:  # corrupt content of the right size: fall back to the previous one
            loaded, why = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        ok = float(acc.reduce(torch.tensor(float(loaded is not None), device=acc.device), "sum"))
        if ok == acc.num_processes:
            state, source_state = apply_checkpoint(acc, folder, loaded, model, optimizer, scheduler)
            return folder, state, source_state
        report(f"skipping unreadable checkpoint {folder}: {why or 'unreadable on another process'}")
    if skipped:
        report(f"no usable checkpoint under {root}: starting this stage from step 0")
    return None


def export_hf(model, tokenizer, out: Path, state_dict: dict | None = None) -> Path:
    """Save a loadable Hugging Face folder atomically. LoRA students: the merged model in
    ``out/`` and the adapter alone in ``out/adapter/``. ``state_dict``: the full weights when the
    model itself holds only this process's shard (FSDP; gathered by ``Run.export``)."""
    out = Path(out)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(tmp / "adapter")
        merged = merged_copy(model)
        merged.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    _write_manifest(tmp)
    old = out.parent / f".old-{out.name}"  # renames, not a slow rmtree, between the old and new folder
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def merged_copy(peft_model):
    """A plain transformers model with the LoRA weights merged in (the peft model is untouched)."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write a temp file beside ``path``, then rename it over ``path`` (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
