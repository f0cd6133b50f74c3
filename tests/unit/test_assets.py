"""The bundled quickstart prompt set (minidistill/assets/prompts_*.jsonl): shape, counts, uniqueness."""

from __future__ import annotations

import difflib
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from minidistill.data import load_instructions
from minidistill.errors import UserError

ASSETS = Path(__file__).resolve().parents[2] / "minidistill" / "assets"
FILES = {"train": ASSETS / "prompts_train.jsonl", "heldout": ASSETS / "prompts_heldout.jsonl"}
COUNTS = {"train": 256, "heldout": 64}
CATEGORIES = {
    "open_qa",
    "explanation",
    "brainstorming",
    "classification",
    "rewriting",
    "extraction",
    "math",
    "writing",
    "advice",
    "definition",
    "comparison",
    "creative",
}
MAX_INSTRUCTION, MAX_INPUT = 200, 400


def _records(split: str) -> list[dict]:
    lines = FILES[split].read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), f"{FILES[split].name}: blank line"
    return [json.loads(line) for line in lines]


def _norm(rec: dict) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", (rec["instruction"] + " " + rec["input"]).lower()).split())


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {s: _records(s) for s in FILES}


def test_record_fields_and_lengths(splits):
    for split, recs in splits.items():
        for k, rec in enumerate(recs, start=1):
            where = f"{FILES[split].name}:{k}"
            assert set(rec) == {"instruction", "input", "category"}, where
            assert all(isinstance(v, str) for v in rec.values()), where
            assert rec["instruction"].strip() and rec["instruction"] == rec["instruction"].strip(), where
            assert rec["input"] == rec["input"].strip(), where
            assert len(rec["instruction"]) <= MAX_INSTRUCTION, where
            assert len(rec["input"]) <= MAX_INPUT, where
            assert rec["category"] in CATEGORIES, where


def test_counts_and_categories(splits):
    for split, recs in splits.items():
        assert len(recs) == COUNTS[split], split
        assert {r["category"] for r in recs} == CATEGORIES, split
    with_input = sum(1 for recs in splits.values() for r in recs if r["input"])
    assert 0.15 <= with_input / sum(COUNTS.values()) <= 0.35


def test_no_duplicates_or_near_duplicates(splits):
    recs = splits["train"] + splits["heldout"]
    keys = [_norm(r) for r in recs]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    assert not dupes, dupes
    for a, b in itertools.combinations(keys, 2):
        sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
        # real_quick_ratio / quick_ratio are cheap upper bounds on ratio()
        if sm.real_quick_ratio() >= 0.9 and sm.quick_ratio() >= 0.9:
            assert sm.ratio() < 0.9, (a, b)


def test_loads_as_prompt_only_instructions():
    """The quickstart loads these through the generate stage's prompt-only path."""
    for split, path in FILES.items():
        examples = load_instructions(path, require_output=False)
        assert len(examples) == COUNTS[split]
        assert all(ex.instruction and ex.outputs == [] for ex in examples)
    with pytest.raises(UserError, match="no 'output'"):
        load_instructions(FILES["heldout"])  # default: references required
