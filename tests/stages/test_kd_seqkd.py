"""KD and SeqKD baselines: loss identities on one batch, tiny end-to-end runs, the teacher-response file."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_assets import INSTRUCTIONS
from transformers import AutoModelForCausalLM

from minidistill import data, models
from minidistill.config import build, load_recipe
from minidistill.errors import UserError
from minidistill.functional.losses import token_divergence
from minidistill.generation import evaluation
from minidistill.generation.evaluation import generate_ids
from minidistill.parts import responses, sources, token_kd
from minidistill.reporting.tracking import read_metrics
from minidistill.run import main
from minidistill.stages import kd, seqkd, sft

# ---- one batch ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_and_batch(tiny_dir):
    teacher, tok = models.load_model(str(tiny_dir))
    teacher = models.freeze(teacher)
    student = models.prune_layers(teacher, [0, 3])
    examples = [data.Example(instruction=i, input=x, outputs=[o]) for i, x, o in INSTRUCTIONS[:4]]
    rows, _ = data.tokenize_sft(examples, tok, max_prompt_length=224, max_length=288)
    batch = sources.collate(rows, tok.pad_token_id, torch.device("cpu"))
    return teacher, student, tok, batch


def cfg(cls=kd.Config, **kw):
    return build(cls, {"type": "kd", **kw}, "test")


def direct_divergence(student, teacher, batch, kind="fkl", v=None, **kw):
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    v = v or s.shape[-1]
    return token_divergence(s[..., :v], t[..., :v], batch["labels"][:, 1:] != -100, kind, **kw)


def test_kd_ratio_0_is_sft_and_never_calls_the_teacher(models_and_batch):
    _, student, _, batch = models_and_batch
    loss, metrics = token_kd.kd_loss(student, None, batch, cfg(kd_ratio=0.0))
    ref, _ = sft.sft_loss(student, batch)
    assert torch.equal(loss, ref)
    assert metrics == {"ce": pytest.approx(float(ref.detach()) / batch["num_tokens"])}


@pytest.mark.parametrize("kind", ["fkl", "rkl", "ce"])
def test_kd_ratio_1_is_the_divergence(models_and_batch, kind):
    teacher, student, _, batch = models_and_batch
    loss, metrics = token_kd.kd_loss(student, teacher, batch, cfg(kd_ratio=1.0, kind=kind, temperature=2.0))
    ref, count = direct_divergence(student, teacher, batch, kind, temperature=2.0)
    assert int(count) == batch["num_tokens"]
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6)
    assert loss.requires_grad
    assert metrics["kd"] == pytest.approx(float(ref.detach()) / batch["num_tokens"], rel=1e-6)
    assert metrics["ce"] > 0


def test_kd_mix_and_gradient(models_and_batch):
    teacher, student, _, batch = models_and_batch
    loss, m = token_kd.kd_loss(student, teacher, batch, cfg(kd_ratio=0.25))
    ce, _ = sft.sft_loss(student, batch)
    div, _ = direct_divergence(student, teacher, batch)
    assert torch.allclose(loss, 0.75 * ce + 0.25 * div, rtol=1e-6)
    assert m["kd"] > 0  # a pruned student differs from its teacher
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)


def test_kd_steps_pull_the_student_to_the_teacher(models_and_batch):
    teacher, _, _, batch = models_and_batch
    student = models.prune_layers(teacher, [0, 3])
    with torch.no_grad():  # the tiny random teacher is near-uniform: push the student away from it first
        student.get_output_embeddings().weight.mul_(10.0)
    c = cfg(kd_ratio=1.0)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-2)
    values = []
    for _ in range(5):
        loss, m = token_kd.kd_loss(student, teacher, batch, c)
        values.append(m["kd"])
        (loss / batch["num_tokens"]).backward()
        opt.step()
        opt.zero_grad()
    assert values[-1] < 0.5 * values[0], values


def test_padded_heads_compare_the_first_vocab_size_logits(models_and_batch):
    teacher, student, tok, batch = models_and_batch
    padded = models.prune_layers(teacher, [0, 1])
    padded.resize_token_embeddings(len(tok) + 13)  # a student head padded beyond the tokenizer
    loss, _ = token_kd.kd_loss(padded, teacher, batch, cfg(kd_ratio=1.0), vocab_size=len(tok))
    ref, _ = direct_divergence(padded, teacher, batch, v=len(tok))
    assert torch.allclose(loss, ref, rtol=1e-6)


def test_configs():
    k, s = kd.Config(), seqkd.Config()
    assert (k.kind, k.kd_ratio, k.temperature) == ("fkl", 0.5, 1.0)
    assert (s.kd_ratio, s.gen_temperature, s.gen_top_p, s.gen_top_k, s.max_new_tokens) == (0.0, 1.0, 1.0, 0, None)
    with pytest.raises(UserError, match="kd_ratio"):
        cfg(kd_ratio=1.5)
    with pytest.raises(UserError, match="kind"):
        cfg(kind="kl")
    with pytest.raises(UserError, match="gen_top_p"):
        build(seqkd.Config, {"type": "seqkd", "gen_top_p": 0}, "test")


# ---- the response file -------------------------------------------------------------------------


def test_rows_from_responses_eos_only_when_finished():
    records = [
        {"index": 5, "output_ids": [7, 8], "finished": True},
        {"index": 2, "output_ids": [9, 9, 9, 9], "finished": False},
    ]
    rows, cut = responses.rows_from_responses(records, [[1, 2], [3, 4, 5]], kept=[2, 5], eos=0, max_length=6)
    assert rows[0] == {"input_ids": [3, 4, 5, 7, 8, 0], "labels": [-100] * 3 + [7, 8, 0], "prompt_length": 3}
    assert rows[1]["input_ids"] == [1, 2, 9, 9, 9, 9] and cut == 0  # no EOS: the teacher was cut off
    rows, cut = responses.rows_from_responses(records, [[1, 2], [3, 4, 5]], kept=[2, 5], eos=0, max_length=5)
    assert [len(r["input_ids"]) for r in rows] == [5, 5] and cut == 2


def test_saved_responses_reused_only_with_same_settings_and_checksum(tmp_path):
    settings = {"format": 1, "seed": 3, "n_prompts": 2, "temperature": 1.0}
    records = [{"index": 0, "output_ids": [1]}, {"index": 1, "output_ids": [2, 3]}]
    responses.save_responses(tmp_path, settings, records, {"sample_seconds": 0.1})
    assert responses.load_responses(tmp_path, dict(settings))[0] == records
    got, why = responses.load_responses(tmp_path, {**settings, "seed": 4})
    assert got is None and "seed" in why
    (tmp_path / responses.RESPONSES).write_text(json.dumps(records[0]) + "\n")
    got, why = responses.load_responses(tmp_path, settings)
    assert got is None and "checksum" in why
    (tmp_path / responses.SIDECAR).unlink()
    assert responses.load_responses(tmp_path, settings)[0] is None
    assert not list(tmp_path.glob(".tmp-*"))


# ---- end to end --------------------------------------------------------------------------------


def stage(kind, **kw):
    s = {
        "type": kind,
        "name": kind,
        "max_steps": 6,
        "lr": 3e-3,
        "batch_size": 4,
        "scheduler": "constant",
        "eval_every": 3,
    }
    s.update(kw)
    return [s]


def test_kd_run_final_loads_and_logs_both_terms(recipe_file):
    path = recipe_file(stage("kd"))
    assert main([str(path)]) == 0
    out = path.parent / "run"
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if r["stage"] == "kd" and "loss" in r]
    assert len(train) == 6 and all(r["ce"] > 0 and r["kd"] > 0 for r in train)
    for r in train:  # the logged loss is the 0.5/0.5 mix of the logged terms (one micro-batch)
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-4)
    assert train[-1]["ce"] < train[0]["ce"]
    valid = [r for r in rows if "valid/loss" in r]
    assert len(valid) == 2 and all(r["valid/kd"] > 0 and "valid/total" in r for r in valid)
    assert valid[-1]["valid/loss"] < valid[0]["valid/loss"]
    model = AutoModelForCausalLM.from_pretrained(out / "kd" / "final")
    assert model.config.num_hidden_layers == 2
    assert (out / "kd" / "best" / "config.json").is_file()


def test_seqkd_samples_teacher_trains_and_reuses_on_resume(recipe_file, tiny_dir, monkeypatch):
    path = recipe_file(
        stage("seqkd", max_steps=4, eval_every=0, max_new_tokens=12, gen_batch_size=8, gen_seed=7, kd_ratio=0.5)
    )
    assert main([str(path)]) == 0
    out = path.parent / "run"
    path_r, side = out / "seqkd" / responses.RESPONSES, out / "seqkd" / responses.SIDECAR
    records = [json.loads(line) for line in path_r.read_text().splitlines()]
    meta = json.loads(side.read_text())
    s = meta["settings"]
    assert (s["temperature"], s["top_p"], s["top_k"], s["max_new_tokens"], s["seed"], s["batch_size"]) == (
        1.0,
        1.0,
        0,
        12,
        7,
        8,
    )
    recipe = load_recipe(path)
    teacher, tok = models.load_model(str(tiny_dir))
    d = recipe.data
    prompt_ids, _, stats = data.tokenize_prompts(
        data.load_instructions(d.train),
        tok,
        template=d.template,
        max_prompt_length=d.max_prompt_length,
        long_prompt=d.long_prompt,
    )
    assert stats.n_dropped_long_prompt == 3  # "Add the numbers." x3: the input preamble is over 224 bytes
    assert s["teacher"] == str(tiny_dir) and s["n_prompts"] == len(prompt_ids) == meta["n_records"] == len(records)
    assert [r["index"] for r in records] == stats.kept_indices
    assert {"instruction", "input", "prompt", "output", "output_ids", "finished", "reference", "source"} <= set(
        records[0]
    )
    assert all(r["finished"] == (len(r["output_ids"]) < 12) for r in records)
    assert records[0]["reference"] == INSTRUCTIONS[0][2] and records[0]["prompt"].endswith("### Response:\n")

    # the records are the teacher's: regenerate the first batch with the same prompts and seed
    first = responses.sample_batches(prompt_ids, 8)[0]
    again = generate_ids(
        models.freeze(teacher),
        tok,
        [prompt_ids[i] for i in first],
        max_new_tokens=12,
        batch_size=8,
        seed=responses.batch_seed(7, 0),
        progress=False,
    )
    assert again == [records[i]["output_ids"] for i in first]
    assert records[first[0]]["output"] == tok.decode(again[0], skip_special_tokens=True).strip()

    assert AutoModelForCausalLM.from_pretrained(out / "seqkd" / "final").config.num_hidden_layers == 2
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "seqkd" and "loss" in r]
    assert len(train) == 4 and all("kd" in r for r in train)
    assert [r for r in read_metrics(out / "metrics.jsonl") if "teacher/generated_tokens" in r]

    # resume after losing the stage's final/: the saved responses are reused, nothing is resampled
    import shutil

    shutil.rmtree(out / "seqkd" / "final")
    before = (path_r.read_text(), side.read_text(), path_r.stat().st_mtime_ns)

    def no_sampling(*a, **k):
        raise AssertionError("teacher resampled on resume")

    monkeypatch.setattr(evaluation, "generate_ids", no_sampling)  # what Teacher.generate samples with
    assert main([str(path), "resume=auto"]) == 0
    assert (path_r.read_text(), side.read_text(), path_r.stat().st_mtime_ns) == before
    assert (out / "seqkd" / "final" / "config.json").is_file()
