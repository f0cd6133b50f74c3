"""The run's output_dir: refuse one this run must not or cannot write to (read-only, before any
model loads), then clear it (``overwrite``), create it and write ``recipe.yaml``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from minidistill.config import RecipeConfig
from minidistill.errors import UserError
from minidistill.reporting.tracking import console
from minidistill.training import checkpoint as ckpt

RUN_CONTROL_KEYS = ("resume", "overwrite", "tensorboard", "threads", "device")


def _identity(resolved_yaml: str) -> dict:
    """What makes two recipes 'the same run' (everything but how this invocation runs it)."""
    import yaml

    d = yaml.safe_load(resolved_yaml) or {}
    return {k: v for k, v in d.items() if k not in RUN_CONTROL_KEYS}


def _same_run(saved_yaml: str, resolved_yaml: str, source: str) -> bool:
    """The saved recipe and this one are the same run: equal as written, or equal once the saved
    one is resolved again by this version (a run saved before an option existed lacks its key,
    and resolving fills it with the value that keeps the old behaviour, the preset's or the
    field's default). A saved recipe this version cannot parse is not the same run."""
    if _identity(saved_yaml) == _identity(resolved_yaml):
        return True
    import yaml

    from minidistill.config import dump_yaml, parse_recipe

    try:
        again = dump_yaml(parse_recipe(yaml.safe_load(saved_yaml) or {}, source))
    except (UserError, TypeError, ValueError):
        return False
    return _identity(again) == _identity(resolved_yaml)


def _leftover(p: Path) -> bool:
    """A file prepare_output_dir itself writes, left by a run killed before recipe.yaml was in place."""
    return p.name == ".write-test" or p.name.startswith(".tmp-recipe.yaml")


def check_output_dir(recipe: RecipeConfig, resolved: str) -> None:
    """Refuse an output_dir this run must not or cannot write to; reads only, writes nothing."""
    out = Path(recipe.output_dir)
    saved = out / "recipe.yaml"
    if out.exists() and not out.is_dir():
        raise UserError(f"recipe.output_dir: '{out}' exists and is not a folder")
    if saved.is_file():
        same = _same_run(saved.read_text(), resolved, str(saved))
        if recipe.overwrite:
            pass
        elif recipe.resume == "auto":
            if not same:
                raise UserError(
                    f"recipe.output_dir: '{out}' holds a run of a different recipe; resume needs the same recipe (or set overwrite=true)"
                )
        else:
            raise UserError(
                f"recipe.output_dir: '{out}' already holds a run; set resume=auto to continue it or overwrite=true to replace it"
            )
    elif out.is_dir() and any(not _leftover(p) for p in out.iterdir()):
        raise UserError(
            f"recipe.output_dir: '{out}' is not empty and holds no minidistill run (no recipe.yaml); "
            "use a new or empty folder"
        )
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"recipe.output_dir: '{parent}' is not a folder, so '{out}' cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"recipe.output_dir: '{out}' is not writable (no write permission on '{parent}')")


def prepare_output_dir(recipe: RecipeConfig, resolved: str) -> None:
    """Check output_dir again, clear it for overwrite, create it and write recipe.yaml."""
    check_output_dir(recipe, resolved)
    out = Path(recipe.output_dir)
    saved = out / "recipe.yaml"
    if saved.is_file() and recipe.overwrite:
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif recipe.resume == "auto" and not saved.is_file():
        console.print(f"resume=auto: no earlier run in '{out}', starting from scratch")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"recipe.output_dir: '{out}' is not writable ({e.strerror})") from None
    ckpt.write_text_atomic(saved, resolved)
