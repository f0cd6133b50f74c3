"""Output heads wider than the tokenizer (Qwen-style padded vocabularies; teacher and student heads
of different widths): every generation and scoring path works over the tokenizer's ids only.

Setup: a 48-token character tokenizer, a teacher with a 64-row head and a student with a 56-row
head. The head rows beyond the tokenizer get a +30 logit bias, so code that samples over the
whole head emits those ids almost surely (checked: ``vocab_size=None`` does emit them).
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_assets import INSTRUCTIONS, fake_run, tiny_recipe
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from minidistill import models as mmodels
from minidistill.config import build
from minidistill.data import Example, collate_prompts
from minidistill.errors import UserError
from minidistill.generation import evaluation
from minidistill.generation.sampler import process_logits, sample
from minidistill.models import logits as fwd
from minidistill.parts import objectives, responses, rollouts, validation
from minidistill.reporting import analysis
from minidistill.run import main
from minidistill.stages import minillm

N_TOK, T_ROWS, S_ROWS = 48, 64, 56
EOS, PAD = 0, 1
BIAS = 30.0


def char_tokenizer() -> PreTrainedTokenizerFast:
    """48 tokens: EOS, pad, unk, then one token per character (text is lower-cased first)."""
    specials = ["<|endoftext|>", "<pad>", "<unk>"]
    chars = list(" abcdefghijklmnopqrstuvwxyz0123456789.,!?:#\n'")
    vocab = {t: i for i, t in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=specials[0], pad_token=specials[1], unk_token=specials[2]
    )
    assert len(tok) == N_TOK and tok.eos_token_id == EOS and tok.pad_token_id == PAD
    return tok


def padded_llama(rows: int, seed: int, layers: int = 2, bias: float = BIAS) -> LlamaForCausalLM:
    """A tiny Llama with a ``rows``-row head; rows >= N_TOK get logit ``bias`` (a head with a bias term)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(cfg).eval()
    if bias:
        head = torch.nn.Linear(32, rows, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[N_TOK:] = bias
        model.lm_head = head
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def teacher():
    return padded_llama(T_ROWS, seed=1, layers=3)


@pytest.fixture(scope="module")
def student():
    return padded_llama(S_ROWS, seed=2)


def prompts(n: int = 4, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, N_TOK, (3 + 2 * i,), generator=g).tolist() for i in range(n)]


def rollout(student, teacher, alpha: float, seed: int = 0, **proc):
    ids, mask = collate_prompts(prompts(), PAD)
    return sample(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=10,
        mix_alpha=alpha,
        eos_token_id=EOS,
        pad_token_id=PAD,
        vocab=N_TOK,
        generator=torch.Generator().manual_seed(seed),
        **proc,
    )


def forward_logps(model, ro, **proc) -> torch.Tensor:
    """Plain (uncached) forward: log-softmax over the first N_TOK processed logits predicting each
    response token. # (B, T, N_TOK)"""
    ids = torch.cat([ro.prompt_ids, ro.response_ids], 1)  # (B, P+T)
    mask = torch.cat([ro.prompt_mask, ro.response_mask], 1)  # (B, P+T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # (B, P+T, rows)
    P, T = ro.prompt_ids.shape[1], ro.response_ids.shape[1]
    return torch.log_softmax(process_logits(logits[:, P - 1 : P - 1 + T, :N_TOK], **proc), -1)


def assert_close_with_inf(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(a)
    torch.testing.assert_close(a[fin], b[fin], atol=2e-5, rtol=0)


# ---- the sampler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, proc", [(0.2, {}), (0.0, {}), (0.0, {"temperature": 0.8, "top_k": 8, "top_p": 0.9})])
def test_sampler_draws_and_scores_over_the_tokenizer_vocab(student, teacher, alpha, proc):
    ro = rollout(student, teacher, alpha, **proc)
    valid = ro.response_mask.bool()
    assert valid.sum() > 10
    assert int(ro.response_ids.max()) < N_TOK
    y = ro.response_ids[..., None]
    lq = forward_logps(student, ro, **proc).gather(-1, y)[..., 0]
    lp = forward_logps(teacher, ro, **proc).gather(-1, y)[..., 0]
    assert_close_with_inf(ro.student_logp[valid], lq[valid])
    assert_close_with_inf(ro.teacher_logp[valid], lp[valid])
    if alpha > 0:
        mix = torch.log(alpha * lp.exp() + (1 - alpha) * lq.exp())
        torch.testing.assert_close(ro.mix_logp[valid], mix[valid], atol=2e-5, rtol=0)
    # the teacher hidden states rebuild the teacher's logits over the tokenizer's ids
    head = fwd.head_logits(teacher, ro.teacher_hidden, N_TOK)  # (B, T, N_TOK)
    lp_h = torch.log_softmax(process_logits(head, **proc), -1).gather(-1, y)[..., 0]
    assert_close_with_inf(lp_h[valid], lp[valid])


def test_sampler_with_heads_of_different_widths_needs_vocab(student, teacher):
    ids, mask = collate_prompts(prompts(), PAD)
    with pytest.raises(ValueError, match="vocab=len"):
        sample(student, teacher, ids, mask, max_new_tokens=4, mix_alpha=0.2, eos_token_id=EOS, pad_token_id=PAD)


@pytest.mark.parametrize("alpha, top_k", [(0.2, 0), (0.0, 8)])
def test_minillm_loss_on_a_padded_head_rollout(student, teacher, alpha, top_k):
    """The loss (logits sliced [:vocab]) sees the sampler's log q: q_theta / q_old = 1 at the first epoch."""
    ro = rollout(student, teacher, alpha, top_k=top_k)
    cfg = build(
        minillm.Config,
        {"type": "minillm", "name": "minillm", "lm_coef": 0.0, "top_k": top_k, "mix_alpha": alpha},
        "test:",
    )
    batch = {f: getattr(ro, f) for f in ro.__dataclass_fields__}
    batch.update(rollouts.advantages_for(cfg, ro))
    batch["num_tokens"] = int(ro.response_mask.sum())
    batch["stats"] = {}
    model = padded_llama(S_ROWS, seed=2)
    model.requires_grad_(True)
    loss, metrics = objectives.minillm_loss(model, batch, cfg=cfg, teacher=teacher, vocab=N_TOK)
    assert torch.isfinite(loss)
    assert metrics["ratio_new_old"] == pytest.approx(1.0, abs=1e-5)
    loss.backward()
    assert torch.isfinite(model.lm_head.weight.grad).all()
    assert float(model.lm_head.weight.grad[N_TOK:].abs().max()) == 0.0  # no probability, no gradient


# ---- HF generate paths: evaluation, analysis, SeqKD / generate -----------------------------------


def test_bias_makes_whole_head_sampling_emit_padded_ids(teacher, tok):
    """Sanity check of the setup: without the vocabulary bound the extra rows are drawn."""
    out = evaluation.generate_ids(teacher, tok, prompts(), max_new_tokens=6, progress=False)
    assert sum(t >= N_TOK for r in out for t in r) > 10


@pytest.mark.parametrize(
    "settings", [{}, {"temperature": 0.0}, {"temperature": 0.7, "top_k": 5, "top_p": 0.8}, {"no_repeat_ngram_size": 2}]
)
def test_generate_ids_never_emits_ids_beyond_the_tokenizer(teacher, student, tok, settings):
    for model in (teacher, student):
        out = evaluation.generate_ids(
            model, tok, prompts(), max_new_tokens=12, progress=False, vocab_size=N_TOK, **settings
        )
        assert sum(len(r) for r in out) > 10
        assert all(0 <= t < N_TOK for r in out for t in r)


@pytest.mark.parametrize("proc", [(1.0, 0, 1.0), (0.7, 5, 0.8)])
def test_generate_processor_is_the_sampler_distribution_over_the_tokenizer(proc):
    scores = torch.randn(3, T_ROWS) * 3
    scores[:, N_TOK:] += BIAS
    out = evaluation._VocabLogits(N_TOK, *proc)(None, scores)  # (3, T_ROWS)
    assert torch.isinf(out[:, N_TOK:]).all()
    expected = torch.log_softmax(process_logits(scores[:, :N_TOK], *proc), -1)
    assert_close_with_inf(torch.log_softmax(out, -1)[:, :N_TOK], expected)


def test_evaluate_instructions_and_sample_and_score_stay_in_the_vocab(teacher, student, tok):
    examples = [Example(instruction=i, input=x, outputs=[o]) for i, x, o in INSTRUCTIONS[:3]]
    res = evaluation.evaluate_instructions(
        student, tok, examples, seeds=[1], max_new_tokens=8, keep_ids=True, progress=False, vocab_size=N_TOK
    )
    ids = [t for g in res["generations"] for t in g["generation_ids"]]
    assert len(ids) > 5 and max(ids) < N_TOK
    # the teacher's samples are fed to the 56-row student: ids >= 56 would not even embed
    s = analysis.sample_and_score(teacher, student, teacher, tok, prompts(), max_new_tokens=8, vocab_size=N_TOK)
    assert sum(len(r) for r in s.responses) > 5 and max(t for r in s.responses for t in r) < N_TOK
    assert all(v >= 0 and v == v for seq in s.fkl for v in seq)


def test_stage_samplers_pass_the_run_vocab(teacher, student, tok, monkeypatch):
    run = fake_run(teacher, tok)
    assert run.vocab_size == N_TOK
    ids = prompts(6)
    settings = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 3, "batch_size": 4}
    pieces = responses.sample(run, settings, ids)  # what the seqkd and generate stages sample with
    assert sorted(i for i, _ in pieces) == list(range(6))
    assert sum(len(r) for _, r in pieces) > 10 and max(t for _, r in pieces for t in r) < N_TOK

    cfg = build(
        minillm.Config,
        {
            "type": "minillm",
            "name": "minillm",
            "lm_coef": 0.0,
            "num_rollouts": 4,
            "rollout_batch_size": 2,
            "batch_size": 2,
            "max_new_tokens": 6,
        },
        "test:",
    )
    source = rollouts.RolloutSource(run, cfg, student, ids, None)
    batch = source.next_batch()
    assert int(source.buffer.rollout.response_ids.max()) < N_TOK and batch["num_tokens"]["response"] > 0

    seen = []
    real = evaluation.generate_ids

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.extend(t for r in out for t in r)
        return out

    monkeypatch.setattr(evaluation, "generate_ids", spy)
    examples = [Example(instruction=i, input=x, outputs=[o]) for i, x, o in INSTRUCTIONS[:2]]
    validation.sampled_rouge(run, examples, max_new_tokens=cfg.max_new_tokens, batch_size=2)(student)  # MiniLLM's
    assert len(seen) > 5 and max(seen) < N_TOK


# ---- the pipeline --------------------------------------------------------------------------------


def test_check_vocab_accepts_wider_heads_and_refuses_narrower(tok, teacher, student):
    assert mmodels.check_vocab(teacher, student, tok) == N_TOK
    with pytest.raises(UserError, match="vocabulary mismatch"):
        mmodels.check_vocab(teacher, padded_llama(N_TOK - 8, seed=3, bias=0.0), tok)


def test_pipeline_with_heads_of_64_and_56_rows(tmp_path, tiny_data, tok):
    """seqkd -> minillm on a 64-row teacher and a 56-row student of a 48-token tokenizer (no bias
    here: a random head puts a quarter of its mass on the 16 extra rows, which the old code drew)."""
    teacher_dir = tmp_path / "teacher"
    padded_llama(T_ROWS, seed=0, bias=0.0).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    stages = [
        {
            "type": "seqkd",
            "name": "seqkd",
            "max_steps": 1,
            "eval_every": 0,
            "max_new_tokens": 12,
            "gen_batch_size": 8,
            "kd_ratio": 0.5,
        },
        {
            "type": "minillm",
            "name": "minillm",
            "max_steps": 1,
            "warmup_steps": 0,
            "num_rollouts": 4,
            "rollout_batch_size": 4,
            "batch_size": 4,
            "ppo_epochs": 1,
            "max_new_tokens": 8,
            "lm_coef": 0.5,
            "lm_batch_size": 2,
            "eval_examples": 2,
            "eval_max_new_tokens": 4,
        },
    ]
    recipe = tiny_recipe(
        tmp_path,
        teacher_dir,
        tiny_data,
        stages,
        student={"init": "config", "config_overrides": {"vocab_size": S_ROWS, "num_hidden_layers": 1}},
    )
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main([str(path)]) == 0
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "seqkd" / responses.RESPONSES).read_text().splitlines()]
    ids = [t for r in records for t in r["output_ids"]]
    assert len(ids) > 20 and max(ids) < N_TOK
    final = LlamaForCausalLM.from_pretrained(out / "minillm" / "final")
    assert final.get_output_embeddings().weight.shape[0] == S_ROWS
