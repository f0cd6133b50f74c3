"""The quickstart pipeline shape on tiny models: teacher data -> PD -> SFT -> MiniLLM -> evaluate,
from prompts alone (no reference outputs, no corpus file), ending in an evaluation table and a report."""

from __future__ import annotations

import json

import pytest
from tiny_assets import write_jsonl
from transformers import AutoModelForCausalLM

from minidistill.run import main

pytestmark = pytest.mark.e2e  # end to end: `./test.sh -m 'not slow and not e2e'` skips it


def test_prompts_only_pipeline(recipe_file, tmp_path, monkeypatch):
    from minidistill import data as mdata

    seen, tokenize_sft = [], mdata.tokenize_sft

    def spy(examples, *args, **kwargs):
        rows, stats = tokenize_sft(examples, *args, **kwargs)
        seen.append((list(examples), rows))
        return rows, stats

    monkeypatch.setattr(mdata, "tokenize_sft", spy)
    prompts = [{"instruction": f"Write something about topic {i}.", "input": ""} for i in range(12)]
    train = write_jsonl(tmp_path / "prompts.jsonl", prompts[:8])
    valid = write_jsonl(tmp_path / "heldout.jsonl", prompts[8:])
    common = {"warmup_steps": 0, "scheduler": "constant", "batch_size": 4}
    stages = [
        {"type": "generate", "name": "teacher_data", "max_new_tokens": 12, "gen_batch_size": 8},
        {"type": "pd", "name": "pd", "max_steps": 2, "lr": 1e-3, **common},
        {"type": "sft", "name": "sft", "max_steps": 2, "lr": 1e-3, **common},
        {
            "type": "minillm",
            "name": "minillm",
            "max_steps": 2,
            "lr": 1e-3,
            "num_rollouts": 4,
            "rollout_batch_size": 4,
            "ppo_epochs": 1,
            "max_new_tokens": 8,
            "lm_batch_size": 2,
            "eval_examples": 2,
            "eval_max_new_tokens": 4,
            **common,
        },
        {
            "type": "evaluate",
            "name": "eval",
            "models": ["teacher", "sft", "student"],
            "max_examples": 4,
            "max_new_tokens": 8,
            "batch_size": 4,
        },
    ]
    data = {
        "train": str(train),
        "valid": str(valid),
        "max_prompt_length": 224,
        "max_length": 288,
        "block_len": 16,
        "valid_blocks": 1,
    }
    path = recipe_file(stages, data=data)
    assert main([str(path)]) == 0
    out = path.parent / "run"
    saved = [json.loads(l) for l in (out / "teacher_data" / "teacher_responses.jsonl").read_text().splitlines()]
    assert len(saved) == 8 and all("output" in r for r in saved)
    # SFT trained on the teacher's answers with EOS after exactly the answers the teacher finished
    assert any(not r["finished"] for r in saved)  # a random tiny teacher rarely stops within 12 tokens
    sft_rows = [
        rows for exs, rows in seen if len(exs) == 8 and [e.response for e in exs] == [r["output"] for r in saved]
    ]
    assert sft_rows, "the SFT stage did not tokenize the teacher's answers"
    assert [row["labels"][-1] == 0 for row in sft_rows[0]] == [r["finished"] for r in saved]  # id 0 = EOS
    assert (out / "teacher_data" / "valid" / "teacher_responses.jsonl").is_file()
    for stage in ("pd", "sft", "minillm"):
        AutoModelForCausalLM.from_pretrained(out / stage / "final")
    table = json.loads((out / "eval_table.json").read_text())
    assert [r["model"] for r in table] == ["teacher", "sft", "student"]
    assert table[0]["reverse_kl"] == 0.0 and table[1]["reverse_kl"] > 0.0 and table[1]["forward_kl"] > 0.0
    assert all(0.0 <= r["rougeL"] <= 100.0 and r["mean_length"] > 0 for r in table)
    report = (out / "report.md").read_text()
    assert "student" in report
    # three held-out prompts answered by the teacher and the students before / after MiniLLM, side by side
    examples = json.loads((out / "eval_examples.json").read_text())
    assert [e["instruction"] for e in examples] == [p["instruction"] for p in prompts[8:11]]
    for e in examples:
        assert list(e["answers"]) == ["teacher", "sft", "student"]
        assert all(1 <= a["tokens"] <= 8 or (a["tokens"] == 0 and a["stopped"]) for a in e["answers"].values())
        assert all(a["stopped"] == (a["tokens"] < 8) for a in e["answers"].values())
    section = report.split("### Example answers", 1)[1].split("\n## ", 1)[0]
    table = [l for l in section.splitlines() if l.startswith("| ")]
    assert table[0] == "| prompt | teacher | sft | student |" and len(table) == 4
    assert all(row.startswith(f"| {e['instruction']} |") for row, e in zip(table[1:], examples))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    walls = {r["stage"]: r["stage_wall_s"] for r in rows if "stage_wall_s" in r}
    assert set(walls) == {"teacher_data", "pd", "sft", "minillm", "eval"} and all(w > 0 for w in walls.values())
    stages_md = report.split("## Stages", 1)[1].split("\n## ", 1)[0]
    stage_rows = {
        l.split("|")[1].strip(): l.split("|")[4].strip()
        for l in stages_md.splitlines()
        if l.startswith("| ") and l.split("|")[1].strip() in walls
    }
    assert set(stage_rows) == set(walls) and all(v.endswith((" s", " min")) for v in stage_rows.values())
    pngs = list((out / "plots").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
