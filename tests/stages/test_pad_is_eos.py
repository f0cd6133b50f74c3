"""pad == eos (SmolLM2, GPT-2): the response's final EOS is a training target everywhere and is never
masked as padding (masks computed as ``ids != pad_id`` would drop it: students that never stop).

The tokenizer is the byte tokenizer with ``pad_token = eos_token`` (what ``models.load_tokenizer``
does for a tokenizer without a pad token), so padding after a response is made of EOS ids too.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_assets import INSTRUCTIONS, fake_run
from tiny_tokenizer import make_tokenizer, tiny_llama

from minidistill import data
from minidistill.config import build
from minidistill.functional import advantages as adv
from minidistill.parts import objectives, responses, rollouts, sources
from minidistill.stages import kd, minillm, seqkd, sft


def pad_is_eos_tokenizer():
    tok = make_tokenizer(pad=False)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id == 0
    return tok


def eos_biased(tok, seed: int, bias: float):
    """tiny_llama with +``bias`` on the EOS logit (a head with a bias term), so samples end early."""
    model = tiny_llama(tok, seed=seed)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = bias
    model.lm_head = head
    return model


@pytest.fixture(scope="module")
def tok():
    return pad_is_eos_tokenizer()


@pytest.fixture(scope="module")
def examples():
    return [data.Example(instruction=i, input=x, outputs=[o]) for i, x, o in INSTRUCTIONS[:4]]


def token_terms(student, teacher, batch):
    """Per-position CE and KL(p||q) of the shifted batch, computed directly. (B, T-1) each"""
    with torch.no_grad():
        lq = torch.log_softmax(
            student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float(), -1
        )
        lp = torch.log_softmax(
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float(), -1
        )
    labels = batch["labels"][:, 1:]
    ce = -lq.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return ce, kl


def check_rows_train_on_eos(rows, batch, eos, student, teacher):
    """Each row's last token is EOS, is a label, attended, counted in num_tokens and in both loss terms."""
    expected_tokens = 0
    for i, r in enumerate(rows):
        n, p = len(r["input_ids"]), r["prompt_length"]
        assert batch["input_ids"][i, n - 1] == eos and batch["labels"][i, n - 1] == eos
        assert batch["attention_mask"][i, n - 1] == 1
        assert (batch["labels"][i, n:] == -100).all() and (batch["input_ids"][i, n:] == eos).all()
        assert (batch["labels"][i, p:n] != -100).all()
        expected_tokens += n - p
    assert batch["num_tokens"] == expected_tokens
    # the losses sum exactly the positions predicting labels p..n-1, the EOS prediction (n-2) included
    ce, kl = token_terms(student, teacher, batch)
    want = torch.zeros_like(ce, dtype=torch.bool)
    for i, r in enumerate(rows):
        want[i, r["prompt_length"] - 1 : len(r["input_ids"]) - 1] = True
    loss, _ = sft.sft_loss(student, batch)
    torch.testing.assert_close(loss, ce[want].sum(), rtol=1e-5, atol=1e-4)
    cfg = build(kd.Config, {"type": "kd", "kd_ratio": 0.5}, "test")
    ce_kd, div = objectives.kd_terms(student, teacher, batch, cfg, len(student.get_output_embeddings().weight))
    torch.testing.assert_close(ce_kd, ce[want].sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(div, kl[want].sum(), rtol=1e-4, atol=1e-4)
    last = torch.tensor([len(r["input_ids"]) - 2 for r in rows])
    assert (ce[torch.arange(len(rows)), last] > 0).all()  # the EOS terms are in those sums, and not zero


def test_sft_and_kd_batches_train_on_the_final_eos(tok, examples):
    rows, _ = data.tokenize_sft(examples, tok, max_prompt_length=224, max_length=288)
    assert len({len(r["input_ids"]) for r in rows}) > 1  # shorter rows carry pad (= EOS) columns
    batch = sources.collate(rows, tok.pad_token_id, torch.device("cpu"))
    check_rows_train_on_eos(rows, batch, tok.eos_token_id, tiny_llama(tok, seed=1), tiny_llama(tok, seed=2))


def test_seqkd_responses_keep_their_eos_and_train_on_it(tok, examples, tmp_path):
    teacher = eos_biased(tok, seed=3, bias=5.0)
    run = fake_run(teacher, tok)
    run.recipe.teacher = SimpleNamespace(model="tiny", gguf_file=None)
    run.recipe.data.max_length = 288
    run.stage_dir = lambda name: tmp_path / name
    run.instructions = lambda split: examples * 2
    run.cached = lambda key, make: make()
    run.log = lambda *a, **k: None
    cfg = build(seqkd.Config, {"type": "seqkd", "name": "seqkd", "max_new_tokens": 10, "gen_batch_size": 4}, "test")
    records = responses.teacher_responses(run, cfg)
    finished = [r for r in records if r["finished"]]
    assert finished and any(r["output_ids"] for r in finished)
    assert all(tok.eos_token_id not in r["output_ids"] for r in records)  # cut at the EOS, marked finished
    prompt_ids, kept = sources.prompts(run)
    rows, _ = responses.rows_from_responses(records, prompt_ids, kept, tok.eos_token_id, 288)
    for rec, row in zip(records, rows):
        assert row["labels"][-1] == tok.eos_token_id if rec["finished"] else row["labels"][-1] != tok.eos_token_id
    rows = [row for rec, row in zip(records, rows) if rec["finished"]]
    batch = sources.collate(rows, tok.pad_token_id, torch.device("cpu"))
    check_rows_train_on_eos(rows, batch, tok.eos_token_id, tiny_llama(tok, seed=1), teacher)


@pytest.mark.parametrize("preset", ["official", "minidistill"])
def test_minillm_rollouts_count_the_eos_in_mask_loss_and_rewards(tok, examples, preset):
    teacher, student = eos_biased(tok, seed=3, bias=4.0), eos_biased(tok, seed=4, bias=4.0)
    run = fake_run(teacher, tok)
    prompts, _, _ = data.tokenize_prompts(examples, tok, max_prompt_length=224)
    cfg = build(
        minillm.Config,
        {
            "type": "minillm",
            "name": "minillm",
            "preset": preset,
            "lm_coef": 0.0,
            "num_rollouts": 8,
            "rollout_batch_size": 8,
            "batch_size": 8,
            "ppo_epochs": 1,
            "max_new_tokens": 10,
        },
        "test:",
    )
    source = rollouts.RolloutSource(run, cfg, student, prompts * 2, None)
    batch = source.next_batch()
    eos = tok.eos_token_id
    ids, mask = batch["response_ids"], batch["response_mask"]
    ended = []  # (row, position of its EOS)
    for i in range(ids.shape[0]):
        hits = (ids[i] == eos).nonzero()[:, 0]
        n = int(mask[i].sum())
        if hits.numel():
            k = int(hits[0])
            assert n == k + 1 and mask[i, : k + 1].all()  # valid up to and including the EOS
            assert (ids[i, k:] == eos).all()  # after it: padding, made of the same id
            ended.append((i, k))
        else:
            assert n == cfg.max_new_tokens and mask[i].all()
    assert any(k + 1 < ids.shape[1] for _, k in ended)  # a finished row followed by padding columns
    assert (
        batch["num_tokens"]["response"]
        == int(mask.sum())
        == sum(k + 1 for _, k in ended) + cfg.max_new_tokens * (ids.shape[0] - len(ended))
    )
    if not cfg.include_current:  # returns start at r_{t+1}: an EOS at t = 0 reaches no return
        ended = [(i, k) for i, k in ended if k >= 1]
    assert ended
    rows = torch.tensor([i for i, _ in ended])
    cols = torch.tensor([k for _, k in ended])
    r_eos = (cfg.reward_scale * (batch["teacher_logp"] - batch["student_logp"]))[rows, cols]
    assert (r_eos != 0).all()
    torch.testing.assert_close(batch["rewards"][rows, cols], r_eos.clamp(-cfg.reward_clip, cfg.reward_clip))
    # the EOS reward reaches the returns: recomputed with it zeroed, they change
    r0 = batch["rewards"].clone()
    r0[rows, cols] = 0.0
    R0 = adv.returns(r0, mask, gamma=cfg.gamma, include_current=cfg.include_current, length_norm=cfg.length_norm)
    first = torch.zeros_like(cols) if not cfg.include_current else cols
    assert ((batch["returns"] - R0)[rows, first].abs() > 0).all()
    # and the EOS token is in the loss: its advantage changes the loss
    loss, _ = objectives.minillm_loss(student, batch, cfg=cfg, teacher=teacher, vocab=len(tok))
    moved = dict(batch, advantages=batch["advantages"].clone())
    moved["advantages"][rows, cols] += 1.0
    loss2, _ = objectives.minillm_loss(student, moved, cfg=cfg, teacher=teacher, vocab=len(tok))
    # one EOS among all response tokens moves a token-mean loss by about ratio/N, which can be under
    # 1e-3 when the batch holds few EOS; anything above float32 rounding shows the token is counted
    assert abs(float(loss2 - loss)) > 1e-6
