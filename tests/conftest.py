"""Shared fixtures: tiny offline models and data built in-process (no network, no downloads)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_tokenizer import make_tokenizer, tiny_llama  # noqa: E402

INSTRUCTIONS = [
    ("Name a color.", "", "Blue."),
    ("Say hello.", "", "Hello!"),
    ("Add the numbers.", "2 and 3", "5"),
    ("Give an animal.", "", "A cat."),
    ("Repeat the word.", "sun", "sun"),
    ("What is the opposite of hot?", "", "Cold."),
    ("Spell the word.", "dog", "d o g"),
    ("Name a fruit.", "", "An apple."),
]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from 2 threads, and on a busy 2-core machine OpenMP spinning makes
    2 threads many times slower than 1: run the suite on one thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny 4-layer Llama 'teacher' with a byte-level tokenizer, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny_teacher")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


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
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS * 3])
    valid = write_jsonl(tmp_path / "valid.jsonl", [
        {"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS[:4]])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The quick brown fox {i} jumps over the lazy dog number {i * 7}." for i in range(60)))
    return {"train": str(train), "valid": str(valid), "corpus": str(corpus)}


def tiny_recipe(tmp_path: Path, tiny_dir: Path, tiny_data: dict, stages: list[dict], **top) -> dict:
    """A recipe mapping over the tiny teacher and data (a 2-layer student pruned from it)."""
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "device": "cpu",
        "teacher": {"model": str(tiny_dir)},
        "student": {"init": "prune", "keep_layers": [0, 3]},
        "data": {"train": tiny_data["train"], "valid": tiny_data["valid"], "max_prompt_length": 224,
                 "max_length": 288, "corpus": [tiny_data["corpus"]], "block_len": 32, "valid_blocks": 4},
        "stages": stages,
    }
    recipe.update(top)
    return recipe


@pytest.fixture()
def recipe_file(tmp_path, tiny_dir, tiny_data):
    """Write a tiny recipe to YAML and return its path; call with stages and top-level overrides."""
    import yaml

    def make(stages: list[dict], name: str = "recipe.yaml", **top) -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(tiny_recipe(tmp_path, tiny_dir, tiny_data, stages, **top), sort_keys=False))
        return p

    return make
