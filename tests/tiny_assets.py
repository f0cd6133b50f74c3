"""Tiny offline assets built in-process (no network): a 4-layer Llama 'teacher' folder, instruction
data and a plain-text corpus, and a recipe mapping over them. Used by tests/conftest.py fixtures and
by tools/kill_resume.py (which runs outside pytest)."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_tokenizer import make_tokenizer

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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def crash_after_first_save(run) -> None:
    """Call ``run()`` with the loop's checkpoint writer patched to raise KeyboardInterrupt right
    after the first checkpoint is written (a crash at that moment); the writer is restored."""
    import pytest

    import minidistill.training.loop as loop

    original = loop.ckpt.save_checkpoint

    def crash_after_save(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    loop.ckpt.save_checkpoint = crash_after_save
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        loop.ckpt.save_checkpoint = original


def save_tiny_teacher(out: Path, hidden: int = 32, max_positions: int = 512) -> Path:
    """A tiny 4-layer Llama with a byte-level tokenizer, saved as an HF folder at ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_tiny_data(folder: Path) -> dict:
    """train/valid instruction jsonl and a corpus text file in ``folder``; returns their paths."""
    folder = Path(folder)
    train = write_jsonl(
        folder / "train.jsonl", [{"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS * 3]
    )
    valid = write_jsonl(
        folder / "valid.jsonl", [{"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS[:4]]
    )
    corpus = folder / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"The quick brown fox {i} jumps over the lazy dog number {i * 7}." for i in range(60))
    )
    return {"train": str(train), "valid": str(valid), "corpus": str(corpus)}


def tiny_recipe(tmp_path: Path, tiny_dir: Path, tiny_data: dict, stages: list[dict], **top) -> dict:
    """A recipe mapping over the tiny teacher and data (a 2-layer student pruned from it)."""
    recipe = {
        "output_dir": str(Path(tmp_path) / "run"),
        "seed": 0,
        "device": "cpu",
        "teacher": {"model": str(tiny_dir)},
        "student": {"init": "prune", "keep_layers": [0, 3]},
        "data": {
            "train": tiny_data["train"],
            "valid": tiny_data["valid"],
            "max_prompt_length": 224,
            "max_length": 288,
            "corpus": [tiny_data["corpus"]],
            "block_len": 32,
            "valid_blocks": 4,
        },
        "stages": stages,
    }
    recipe.update(top)
    return recipe


class FakeAccelerator:
    """The one-process slice of ``accelerate.Accelerator`` that stage helpers call (sum-reduce is
    the identity, autocast does nothing), for driving stage code without a full ``Run``."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device: str = "cpu"):
        import torch

        self.device = torch.device(device)

    def reduce(self, tensor, reduction: str = "sum"):
        return tensor

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        pass


def fake_run(
    teacher,
    tokenizer,
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    template: str = "alpaca",
    max_prompt_length: int = 224,
    long_prompt: str = "drop",
):
    """A stand-in for ``minidistill.pipeline.context.Run`` with what the sampling/rollout helpers of the stages
    read: accelerator, device, teacher (a ``teacher.Teacher`` of the same tokenizer), tokenizer, vocab_size (default ``len(tokenizer)``), recipe.seed
    and recipe.data.template/max_prompt_length/long_prompt."""
    from types import SimpleNamespace

    import torch

    from minidistill.teacher import Teacher

    data = SimpleNamespace(template=template, max_prompt_length=max_prompt_length, long_prompt=long_prompt)
    vocab = len(tokenizer) if vocab_size is None else vocab_size
    return SimpleNamespace(
        accelerator=FakeAccelerator(),
        device=torch.device("cpu"),
        teacher=Teacher(teacher, tokenizer, "teacher", vocab_size=vocab),
        precision="fp32",
        tokenizer=tokenizer,
        vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
        recipe=SimpleNamespace(seed=seed, data=data),
    )
