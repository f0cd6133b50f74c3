"""Cross-tokenizer distillation through the stages: tiny KD / PD / SeqKD / MiniLLM runs between a
byte-level teacher and students with other tokenizers (word-piece BPE, SentencePiece-style), the
MiniLLM reward against a direct teacher forward, and the refusals (exit 2, one line, nothing
written)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_tokenizer import make_bpe_tokenizer, make_sp_tokenizer, tiny_llama

from minidistill import data, models
from minidistill.config import build
from minidistill.functional import xtok
from minidistill.generation.sampler import sample
from minidistill.reporting.tracking import read_metrics
from minidistill.run import main
from minidistill.stages import minillm
from minidistill.teacher import Teacher


def save_student(folder, tokenizer, seed: int = 1):
    model = tiny_llama(tokenizer, seed=seed, max_positions=512)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bpe_student(tmp_path_factory):
    return save_student(tmp_path_factory.mktemp("bpe_student"), make_bpe_tokenizer())


@pytest.fixture(scope="module")
def sp_student(tmp_path_factory):
    return save_student(tmp_path_factory.mktemp("sp_student"), make_sp_tokenizer())


def across(student) -> list[str]:
    return ["student.init=pretrained", f"student.model={student}", "student.keep_layers=null"]


def rows(path, stage: str) -> list[dict]:
    return [r for r in read_metrics(path) if r.get("stage") == stage]


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else None


def refused(capsys, argv, *needles, out):
    before = snapshot(out)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert (
        "Traceback" not in err
        and lines[-1].startswith("error: ")
        and len([ln for ln in lines if ln.startswith("error: ")]) == 1
    ), err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    assert snapshot(out) == before
    return lines[-1]


# ---------------------------------------------------------------- training runs


@pytest.mark.parametrize("kind", ["uld", "uld_hybrid"])
def test_kd_across_tokenizers_lowers_the_divergence(recipe_file, sharp_dir, bpe_student, tmp_path, kind):
    stage = {"type": "kd", "name": "kd", "kind": kind, "kd_ratio": 1.0, "max_steps": 12, "lr": 3e-3, "batch_size": 8}
    stage |= {"scheduler": "constant", "uld_top_k": 64 if kind == "uld" else 0}
    path = recipe_file([stage], teacher={"model": str(sharp_dir)})
    assert main([str(path), *across(bpe_student)]) == 0
    out = tmp_path / "run"
    log = rows(out / "metrics.jsonl", "kd")
    kd = [r["kd"] for r in log if "kd" in r and "valid/kd" not in r]
    assert kd[0] > 0 and sum(kd[-3:]) / 3 < 0.8 * sum(kd[:3]) / 3, kd
    assert all(0.3 < r["aligned"] <= 1.0 for r in log if "aligned" in r)  # word pieces: not every token pairs
    valid = [r for r in log if "valid/kd" in r]
    assert valid and valid[-1]["valid/kd"] > 0
    # the student keeps its own tokenizer
    assert models.load_tokenizer(str(out / "kd" / "final")).get_vocab() == make_bpe_tokenizer().get_vocab()


def test_pd_across_tokenizers_lowers_the_divergence(recipe_file, sharp_dir, sp_student, tmp_path):
    stage = {"type": "pd", "name": "pd", "kd_kind": "uld_hybrid", "top_k": 8, "alpha": 0.9, "max_steps": 12}
    stage |= {"lr": 3e-3, "scheduler": "constant", "batch_size": 4}
    path = recipe_file([stage], teacher={"model": str(sharp_dir)})
    assert main([str(path), *across(sp_student)]) == 0
    log = rows(tmp_path / "run" / "metrics.jsonl", "pd")
    kd = [r["kd_loss"] for r in log if "kd_loss" in r]
    assert sum(kd[-3:]) / 3 < 0.9 * sum(kd[:3]) / 3, kd
    valid = [r["valid/kd_loss"] for r in log if "valid/kd_loss" in r]
    assert len(valid) == 2 and valid[-1] < valid[0]  # held-out divergence: before and after


def test_seqkd_across_tokenizers_trains_on_the_teachers_text(recipe_file, tiny_dir, bpe_student, tmp_path):
    stage = {"type": "seqkd", "name": "seqkd", "kd_ratio": 0.5, "kind": "uld", "max_steps": 2, "max_new_tokens": 8}
    stage |= {"gen_batch_size": 8, "batch_size": 4}
    path = recipe_file([stage])
    assert main([str(path), *across(bpe_student), "data.max_examples=8"]) == 0
    out = tmp_path / "run"
    records = [json.loads(x) for x in (out / "seqkd" / "teacher_responses.jsonl").read_text().splitlines()]
    teacher_tok = models.load_tokenizer(str(tiny_dir))
    # the teacher sampled in its own tokens (one per byte): the text decodes from them
    assert all(teacher_tok.decode(r["output_ids"], skip_special_tokens=True).strip() == r["output"] for r in records)
    log = rows(out / "metrics.jsonl", "seqkd")
    assert any("kd" in r and "aligned" in r for r in log)


def test_seqkd_without_kd_needs_no_cross_tokenizer_kind(recipe_file, bpe_student, tmp_path):
    stage = {"type": "seqkd", "name": "seqkd", "max_steps": 1, "max_new_tokens": 4, "batch_size": 4}
    assert main([str(recipe_file([stage])), *across(bpe_student), "data.max_examples=4"]) == 0


def test_generate_then_kd_across_tokenizers(recipe_file, bpe_student, tmp_path):
    """The teacher writes the references from its own prompt rendering; KD learns them in the student's tokens."""
    stages = [
        {"type": "generate", "name": "gen", "max_new_tokens": 6, "corpus": False},
        {"type": "kd", "name": "kd", "kind": "uld", "max_steps": 1, "batch_size": 4},
    ]
    assert main([str(recipe_file(stages)), *across(bpe_student), "data.max_examples=4"]) == 0
    assert (tmp_path / "run" / "gen" / "teacher_responses.jsonl").is_file()
    assert any("aligned" in r for r in rows(tmp_path / "run" / "metrics.jsonl", "kd"))


def test_minillm_across_tokenizers_runs(recipe_file, sharp_dir, sp_student, tmp_path):
    stage = {"type": "minillm", "name": "minillm", "cross_tokenizer": True, "single_step": False}
    stage |= {"max_steps": 2, "num_rollouts": 4, "batch_size": 4, "rollout_batch_size": 4, "ppo_epochs": 1}
    stage |= {"max_new_tokens": 6, "kd_ratio": 0.0, "lm_batch_size": 2, "eval_examples": 2, "warmup_steps": 0}
    path = recipe_file([stage], teacher={"model": str(sharp_dir)})
    assert main([str(path), *across(sp_student)]) == 0
    log = rows(tmp_path / "run" / "metrics.jsonl", "minillm")
    steps = [r for r in log if "reward" in r]
    assert steps and all(r["reward"] < 0 and r["rkl_estimate"] > 0 for r in steps)  # a random student is far off


# ---------------------------------------------------------------- the reward estimator


SETTINGS = (1.0, 0, 1.0)  # temperature, top_k, top_p of the minillm defaults


def reward_setup(teacher_dir, student_tok):
    from tiny_assets import INSTRUCTIONS, fake_run

    teacher, t_tok = models.load_model(str(teacher_dir))
    teacher = models.freeze(teacher)
    run = fake_run(teacher, student_tok)
    run.teacher = Teacher(teacher, t_tok, "t", vocab_size=len(t_tok), student_tokenizer=student_tok)
    run.teacher.aligner = xtok.Aligner(t_tok, student_tok, "t", "s")
    cfg = build(
        minillm.Config, {"type": "minillm", "cross_tokenizer": True, "single_step": False, "kd_ratio": 0.0}, "t"
    )
    examples = [data.Example(instruction=i, input=x, outputs=[o]) for i, x, o in INSTRUCTIONS[:4]]
    s_prompts, _, _ = data.tokenize_prompts(examples, student_tok, max_prompt_length=1000)
    t_prompts, _, _ = data.tokenize_prompts(examples, t_tok, max_prompt_length=1000)
    assert len(s_prompts) == len(t_prompts) == len(examples)
    return run, cfg, teacher, t_tok, s_prompts, t_prompts


def text_rollout(tok, prompts, responses: list[str], ended: list[bool]):
    """A Rollout whose responses are the given texts in ``tok``'s tokens (EOS where ``ended``)."""
    from minidistill.generation.sampler import Rollout

    ids, mask = data.collate_prompts(prompts, tok.pad_token_id)
    resp = [
        list(tok(r, add_special_tokens=False)["input_ids"]) + ([tok.eos_token_id] if e else [])
        for r, e in zip(responses, ended)
    ]
    width = max(len(r) for r in resp)
    r_ids = torch.full((len(resp), width), tok.pad_token_id)
    r_mask = torch.zeros((len(resp), width), dtype=torch.long)
    for b, r in enumerate(resp):
        r_ids[b, : len(r)], r_mask[b, : len(r)] = torch.tensor(r), 1
    z = torch.zeros(r_ids.shape)
    return Rollout(ids, mask, r_ids, r_mask, z, z.clone(), z.clone())


RESPONSES = ["Blue, the sky.", "Hello! é🙂", "5", "the cat sat on the other mat"]


def test_minillm_cross_tokenizer_reward_sums_to_the_teachers_log_prob_of_the_text(tiny_dir):
    """Each response's spread rewards sum to log p(text) under the teacher (a direct forward over
    its prompt + its tokenization of the text), for given texts and for sampled ones (random
    bytes: invalid UTF-8 becomes U+FFFD in the text both sides read)."""
    s_tok = make_sp_tokenizer()
    run, cfg, teacher, t_tok, s_prompts, t_prompts = reward_setup(tiny_dir, s_tok)
    g = torch.Generator().manual_seed(0)
    ids, mask = data.collate_prompts(s_prompts, s_tok.pad_token_id)
    sampled = sample(tiny_llama(s_tok, seed=3), None, ids, mask, max_new_tokens=12, mix_alpha=0.0,
                     eos_token_id=s_tok.eos_token_id, pad_token_id=s_tok.pad_token_id, vocab=len(s_tok), generator=g)  # fmt: skip
    given = text_rollout(s_tok, s_prompts, RESPONSES, [True, False, True, True])
    tt = xtok.TokenText(s_tok, "s")
    for ro in (given, sampled):
        spread, _ = run.teacher.response_logp(ro, SETTINGS, chunk=cfg.chunk_rows, teacher_prompts=t_prompts)
        assert spread.shape == ro.response_ids.shape and torch.all(spread[ro.response_mask == 0] == 0)
        for b in range(ro.batch_size):
            n = int(ro.response_mask[b].sum())
            resp = ro.response_ids[b, :n].tolist()
            text = tt.spans([t for t in resp if t != s_tok.eos_token_id]).pieces[0]
            if ro is given:
                assert text == RESPONSES[b]
            t_resp = list(t_tok(text, add_special_tokens=False)["input_ids"])
            t_resp += [t_tok.eos_token_id] if resp[-1] == s_tok.eos_token_id else []
            with torch.no_grad():
                logp = torch.log_softmax(teacher(torch.tensor([t_prompts[b] + t_resp])).logits[0, :-1].float(), -1)
            p = len(t_prompts[b])
            ref = sum(float(logp[p - 1 + k, t]) for k, t in enumerate(t_resp))  # log p(text) under the teacher
            assert float(spread[b, :n].sum()) == pytest.approx(ref, abs=1e-3)


def test_minillm_cross_tokenizer_reward_with_one_tokenizer_is_the_token_reward(tiny_dir):
    """With one tokenizer and responses in its canonical tokenization the spread reward is the
    per-token teacher log-prob the same-tokenizer path records."""
    from minidistill.generation.sampler import score

    tok = models.load_tokenizer(str(tiny_dir))
    run, cfg, teacher, _, prompts, _ = reward_setup(tiny_dir, tok)
    ro = text_rollout(tok, prompts, RESPONSES, [True, False, True, True])
    token_level, _ = score(teacher, ro, keep_hidden=False, vocab=len(tok))
    spread, _ = run.teacher.response_logp(ro, SETTINGS, chunk=cfg.chunk_rows, teacher_prompts=prompts)
    ascii_rows = [0, 2, 3]
    assert torch.allclose(spread[ascii_rows], token_level[ascii_rows], atol=1e-5)
    # "é🙂": the bytes that only start a character get nothing, the byte completing it their sum
    assert torch.allclose(spread[1].sum(), token_level[1].sum(), atol=1e-4)
    n_plain = len("Hello! ")
    assert torch.allclose(spread[1, :n_plain], token_level[1, :n_plain], atol=1e-5)
    assert spread[1, n_plain] == 0 and spread[1, n_plain + 2 : n_plain + 5].eq(0).all()  # é = 2 bytes, 🙂 = 4
    assert torch.allclose(spread[1, n_plain + 1], token_level[1, n_plain : n_plain + 2].sum(), atol=1e-5)
    assert torch.allclose(spread[1, n_plain + 5], token_level[1, n_plain + 2 : n_plain + 6].sum(), atol=1e-5)


# ---------------------------------------------------------------- refusals


def test_a_student_with_another_tokenizer_and_a_one_vocabulary_kind_is_refused(
    recipe_file, bpe_student, tmp_path, capsys
):
    stage = {"type": "kd", "name": "kd", "kind": "fkl", "max_steps": 1}
    refused(capsys, [recipe_file([stage]), *across(bpe_student)], "student.model: tokenizer differs from the teacher's",
            "stage 'kd' compares kind 'fkl' over one vocabulary", "kind: uld or uld_hybrid", out=tmp_path / "run")  # fmt: skip


def test_a_teacher_unused_across_tokenizers_is_still_refused_with_the_hint(recipe_file, bpe_student, tmp_path, capsys):
    refused(capsys, [recipe_file([{"type": "sft", "name": "sft", "max_steps": 1}]), *across(bpe_student)],
            "distillation needs the same tokenizer", "kd/seqkd kind: uld", "minillm cross_tokenizer: true",
            out=tmp_path / "run")  # fmt: skip


@pytest.mark.parametrize(
    "stages,needles",
    [
        ([{"type": "minillm", "name": "m", "max_steps": 1}], ["stage 'm' scores its rewards", "cross_tokenizer: true"]),
        ([{"type": "pd_store", "name": "s"}], ["stage 's' stores teacher distributions", "teacher_logits: online"]),
        (
            [{"type": "kd", "name": "kd", "kind": "uld", "max_steps": 1}, {"type": "evaluate", "name": "ev"}],
            ["stage 'ev' measures per-token KL", "eval/instruct_eval.py"],
        ),
    ],
)
def test_stages_without_a_cross_tokenizer_form_are_refused(recipe_file, bpe_student, tmp_path, capsys, stages, needles):
    refused(capsys, [recipe_file(stages), *across(bpe_student)], *needles, out=tmp_path / "run")


@pytest.mark.parametrize(
    "extra,needles",
    [
        ({}, ["(m).single_step: the single-step term is an exact KL over one vocabulary", "single_step: false"]),
        (
            {"single_step": False, "mix_alpha": 0.2},
            ["(m).mix_alpha: teacher-mixed sampling", "same tokens at every step"],
        ),
        ({"single_step": False}, ["(m).kd_ratio: L_PT's KD term", "kd_ratio: 0"]),
    ],
)
def test_minillm_cross_tokenizer_settings_are_checked_before_any_model_loads(
    recipe_file, tmp_path, capsys, extra, needles
):
    stage = {"type": "minillm", "name": "m", "cross_tokenizer": True, **extra}
    refused(capsys, [recipe_file([stage])], *needles, out=tmp_path / "run")


def test_offline_pd_with_a_cross_tokenizer_kind_is_refused(recipe_file, tmp_path, capsys):
    stages = [
        {"type": "pd_store", "name": "store"},
        {"type": "pd", "name": "pd", "kd_kind": "uld", "teacher_logits": "offline"},
    ]
    refused(capsys, [recipe_file(stages)], "(pd).kd_kind: 'uld' needs teacher_logits 'online'", out=tmp_path / "run")


def test_a_student_tokenizer_without_byte_fallback_is_refused_naming_the_model(recipe_file, tmp_path, capsys):
    student = save_student(tmp_path / "nofallback", make_sp_tokenizer(byte_fallback=False))
    stage = {"type": "kd", "name": "kd", "kind": "uld", "max_steps": 1}
    refused(capsys, [recipe_file([stage]), *across(student)], f"student.model '{student}'", "no byte fallback",
            out=tmp_path / "run")  # fmt: skip


def test_one_tokenizer_keeps_todays_paths(recipe_file, tmp_path):
    """A same-tokenizer run builds no aligner unless a stage asks for a cross-tokenizer kind."""
    from minidistill.config import load_recipe
    from minidistill.pipeline.build import build_student, load_teacher
    from minidistill.pipeline.context import Run

    run = Run(load_recipe(recipe_file([{"type": "kd", "name": "kd", "max_steps": 1}])))
    load_teacher(run)
    build_student(run)
    assert run.teacher.aligner is None and run.teacher.tokenizer is run.tokenizer and not run.cross_tokenizer
    run = Run(load_recipe(recipe_file([{"type": "kd", "name": "kd", "kind": "uld", "max_steps": 1}], name="r2.yaml")))
    load_teacher(run)
    build_student(run)
    assert run.teacher.aligner is not None and run.teacher.tokenizer is run.tokenizer and not run.cross_tokenizer
