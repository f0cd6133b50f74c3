"""eval/eos_on_items.py: EOS rate and length of every model on the items one model was scored on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "eval"))

from eos_on_items import eos_on_items  # noqa: E402

from minidistill.errors import UserError  # noqa: E402


def _model(out: Path, name: str, lengths: dict[int, list[int]], scored: list[int]) -> None:
    folder = out / "eval" / name
    folder.mkdir(parents=True)
    summary = {"settings": {"max_new_tokens": 8}, "item_scores": {"d": {str(i): [0.0] for i in scored}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [{"index": i, "seed": s, "generation_ids": [5] * n} for i, ns in lengths.items() for s, n in enumerate(ns)]
    (folder / "d.generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eos_rate_and_length_on_the_control_items(tmp_path):
    _model(tmp_path, "teacher", {0: [3, 8], 1: [8, 8], 2: [1, 1]}, [0, 1, 2])
    _model(tmp_path, "abl", {0: [2, 2], 1: [8, 4]}, [0, 1])
    rows = eos_on_items(tmp_path, "abl", "d")
    # items 0 and 1 only; a response of max_new_tokens (8) ids did not stop
    assert rows["teacher"] == {"eos_rate": pytest.approx(1 / 4), "mean_length": pytest.approx(27 / 4), "n_samples": 4}
    assert rows["abl"] == {"eos_rate": pytest.approx(3 / 4), "mean_length": pytest.approx(16 / 4), "n_samples": 4}
    with pytest.raises(UserError, match="--test: abl was not scored on 'x'"):
        eos_on_items(tmp_path, "abl", "x")
    with pytest.raises(UserError, match="--items: .*nope"):
        eos_on_items(tmp_path, "nope", "d")
