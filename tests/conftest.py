"""Shared fixtures: tiny offline models and data built in-process (no network, no downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_assets import INSTRUCTIONS, save_tiny_teacher, tiny_recipe, write_jsonl, write_tiny_data  # noqa: E402,F401


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from 2 threads, and on a busy 2-core machine OpenMP spinning makes
    2 threads many times slower than 1: run the suite on one thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny 4-layer Llama 'teacher' with a byte-level tokenizer, saved as an HF folder."""
    return save_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="session")
def sharp_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny teacher with its (tied) embeddings scaled up: peaked next-token distributions,
    so a student pruned from it starts measurably far from it (random tiny models are near-uniform)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    out = tmp_path_factory.mktemp("sharp_teacher")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


@pytest.fixture()
def tiny_data(tmp_path) -> dict:
    return write_tiny_data(tmp_path)


@pytest.fixture()
def recipe_file(tmp_path, tiny_dir, tiny_data):
    """Write a tiny recipe to YAML and return its path; call with stages and top-level overrides."""
    import yaml

    def make(stages: list[dict], name: str = "recipe.yaml", **top) -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(tiny_recipe(tmp_path, tiny_dir, tiny_data, stages, **top), sort_keys=False))
        return p

    return make
