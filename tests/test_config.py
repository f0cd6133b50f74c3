"""Recipe parsing, validation, overrides, dry-run and the CLI's exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from minidistill.config import apply_override, load_recipe, parse_recipe
from minidistill.errors import UserError
from minidistill.run import main

SFT = [{"type": "sft", "name": "sft", "max_steps": 2, "lr": 1e-3}]


def test_load_and_defaults(recipe_file):
    r = load_recipe(recipe_file(SFT))
    assert r.stages[0].name == "sft" and r.stages[0].lr == 1e-3
    assert r.stages[0].batch_size == 8  # documented default
    assert r.student.init == "prune" and r.student.keep_layers == [0, 3]


def test_unknown_key_suggests_closest(recipe_file):
    with pytest.raises(UserError, match=r"stages\[0\] \(sft\)\.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_recipe(recipe_file([{"type": "sft", "lrr": 1.0}]))
    with pytest.raises(UserError, match=r"student\.lora\.rank: unknown key"):
        load_recipe(recipe_file(SFT), ["student.lora.rank=4"])


@pytest.mark.parametrize("override,pattern", [
    ("seed=abc", r"seed: expected an integer, got 'abc'"),
    ("stages.sft.lr=-1", r"lr: expected a value >= 0.0"),
    ("stages.sft.batch_size=0", r"batch_size: expected a value >= 1"),
    ("precision=fp8", r"precision: expected one of 'fp32', 'bf16', 'fp16'"),
    ("stages.0.scheduler=step", r"scheduler: expected one of"),
    ("student.keep_layers=3", r"keep_layers: expected a list of an integer or null"),
    ("stages.nope.lr=1", r"no stage named 'nope'"),
    ("data.max_prompt_length=999", r"max_prompt_length: must be < data.max_length"),
])
def test_bad_values(recipe_file, override, pattern):
    with pytest.raises(UserError, match=pattern):
        load_recipe(recipe_file(SFT), [override])


def test_overrides_by_name_index_and_nested(recipe_file):
    r = load_recipe(recipe_file(SFT), ["stages.sft.lr=0.5", "stages.0.max_steps=7", "student.lora.r=4",
                                       "student.keep_layers=[0,1,2]", "seed=3"])
    assert (r.stages[0].lr, r.stages[0].max_steps, r.student.lora.r, r.student.keep_layers, r.seed) == (0.5, 7, 4, [0, 1, 2], 3)


def test_stage_errors(recipe_file):
    with pytest.raises(UserError, match=r"unknown stage type 'sfft' \(did you mean 'sft'\?\)"):
        load_recipe(recipe_file([{"type": "sfft"}]))
    with pytest.raises(UserError, match=r"duplicate stage name 'a'"):
        load_recipe(recipe_file([{"type": "sft", "name": "a"}, {"type": "sft", "name": "a"}]))
    with pytest.raises(UserError, match=r"stages: expected a non-empty list"):
        load_recipe(recipe_file([]))


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("output_dir: x\nseed: [1, 2\nteacher: {}\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+:\d+: YAML syntax error"):
        load_recipe(p)


def test_override_syntax():
    with pytest.raises(UserError, match="expected dotted.key=value"):
        apply_override({}, "seed")
    d = {}
    apply_override(d, "data.corpus=[a.txt, b.txt]")
    assert d == {"data": {"corpus": ["a.txt", "b.txt"]}}


def test_required_fields():
    with pytest.raises(UserError, match="output_dir: required"):
        parse_recipe({"teacher": {"model": "x"}, "stages": SFT}, "r.yaml")
    with pytest.raises(UserError, match="teacher.model: required"):
        parse_recipe({"output_dir": "o", "stages": SFT}, "r.yaml")


def test_cli_dry_run_prints_resolved_yaml(recipe_file, capsys):
    path = recipe_file(SFT)
    assert main([str(path), "stages.sft.lr=0.25", "--dry-run"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["stages"][0]["lr"] == 0.25 and out["stages"][0]["warmup_steps"] == 0
    assert not (path.parent / "run").exists()  # dry run writes nothing


def test_cli_exit_2_and_nothing_written(recipe_file):
    path = recipe_file([{"type": "sft", "lrr": 1}])
    proc = subprocess.run([sys.executable, "-m", "minidistill.run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "lrr" in lines[0] and "did you mean 'lr'" in lines[0]
    assert not (path.parent / "run").exists()


def test_recipe_reference_is_current():
    """docs/recipe-reference.md is generated from the dataclasses; regenerate it when a field changes."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("recipe_reference", root / "tools" / "recipe_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (root / "docs" / "recipe-reference.md").read_text() == mod.render(), "run: python tools/recipe_reference.py"


def test_shipped_recipes_parse(tmp_path):
    """Every recipe under recipes/ validates (models and data are not loaded)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    recipes = sorted((root / "recipes").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        r = load_recipe(path)
        assert r.stages and r.output_dir
