"""pipeline.outputs: when an output_dir's saved recipe counts as the same run (resume: auto)."""

from __future__ import annotations

from pathlib import Path

from minidistill.config import dump_yaml, load_recipe
from minidistill.pipeline.outputs import _same_run

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "compare" / "minillm.yaml"


def test_a_run_saved_before_an_option_existed_is_the_same_run():
    """A saved recipe without a key this version added (here mask_truncated, whose preset value
    is false) is the same run once resolved again; the key at another value, another setting or
    a recipe this version cannot parse is not."""
    text = dump_yaml(load_recipe(RECIPE))
    assert "  mask_truncated: false\n" in text
    older = text.replace("  mask_truncated: false\n", "")
    assert _same_run(text, text, "r") and _same_run(older, text, "r")
    assert not _same_run(text.replace("mask_truncated: false", "mask_truncated: true"), text, "r")
    assert not _same_run(older.replace("bootstrap_truncated: true", "bootstrap_truncated: false"), text, "r")
    assert not _same_run(older.replace("type: minillm", "type: nosuchstage"), text, "r")
    assert not _same_run("", text, "r")
