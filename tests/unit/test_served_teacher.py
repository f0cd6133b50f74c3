"""minidistill.teacher.served: the served teacher's pure parts against closed forms, and the
teacher itself against the local teacher through a small completions server backed by the same
model (tests/served_double.py; the real vLLM server is tested in tests/vllm_tests/)."""

from __future__ import annotations

import math

import pytest
import torch
from served_double import Double
from tiny_tokenizer import make_bpe_tokenizer, make_tokenizer, tiny_llama

from minidistill.errors import UserError
from minidistill.functional import xtok
from minidistill.functional.losses import NEG_INF
from minidistill.generation.sampler import Rollout
from minidistill.models.logit_store import truncate_raw
from minidistill.stages import stage
from minidistill.teacher import Teacher
from minidistill.teacher.served import (
    Client,
    ServedTeacher,
    check_stages,
    dense_logprobs,
    parse_prompt_logprobs,
    topk_truncate,
)

# ---- pure parts ---------------------------------------------------------------------------------


def test_parse_prompt_logprobs_reads_the_token_there_and_the_top_k():
    ids = [5, 7, 9]
    entries = [
        None,
        {"7": {"logprob": -0.5}, "3": {"logprob": -1.5}},  # the token there is the top 1
        {"9": {"logprob": -4.0}, "2": {"logprob": -0.1}, "3": {"logprob": -2.0}},  # outside the top 2
    ]
    actual, idx, lp = parse_prompt_logprobs(entries, ids, k=2)
    assert actual.tolist() == [-0.5, -4.0]
    assert idx[0].tolist()[:2] == [7, 3] and lp[0, 2] == NEG_INF  # 2 filled, one unused slot
    assert idx[1].tolist() == [2, 3, 9] and torch.allclose(
        lp[1], torch.tensor([-0.1, -2.0, -4.0])
    )  # sorted, all 3 kept
    with pytest.raises(ValueError):
        parse_prompt_logprobs([None, {"3": {"logprob": -1.0}}], [5, 7], k=1)  # no entry for the token there


def test_topk_truncate_equals_the_store_truncation_of_the_full_distribution():
    torch.manual_seed(0)
    z = torch.randn(3, 5, 50) * 3
    lp = z.log_softmax(-1)
    served = lp.topk(20, -1)  # what a server with logprobs 20 gives
    for top_p, top_k in [(1.0, 20), (0.9, 20), (0.5, 8), (0.95, 1)]:
        got = topk_truncate(served.indices, served.values, top_p, top_k)
        ref = truncate_raw(z, top_p, top_k)
        assert torch.equal(got.indices, ref.indices)
        torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=0, atol=1e-5)


def test_dense_logprobs_keeps_the_top_k_and_spreads_the_rest_evenly():
    V = 10
    idx = torch.tensor([[0, 4, 0], [3, 0, 0]])  # row 0: ids 0 and 4 kept, one unused slot (id 0 again)
    lp = torch.tensor([[math.log(0.5), math.log(0.3), NEG_INF], [math.log(0.9), NEG_INF, NEG_INF]])
    d = dense_logprobs(idx, lp, V).exp()
    torch.testing.assert_close(d.sum(-1), torch.ones(2))
    assert abs(d[0, 0] - 0.5) < 1e-6 and abs(d[0, 4] - 0.3) < 1e-6  # the unused slot did not overwrite id 0
    rest = [v for j, v in enumerate(d[0].tolist()) if j not in (0, 4)]
    assert max(rest) - min(rest) < 1e-7 and abs(rest[0] - 0.2 / 8) < 1e-6
    assert abs(d[1, 3] - 0.9) < 1e-6 and abs(d[1, 0] - 0.1 / 9) < 1e-6
    empty = dense_logprobs(torch.zeros(1, 2, dtype=torch.long), torch.full((1, 2), NEG_INF), V).exp()
    torch.testing.assert_close(empty, torch.full((1, V), 1 / V))


def test_topk_reverse_kl_estimate_is_exact_when_the_teacher_fits_in_k():
    """The single-step term with a served teacher: exact whenever the teacher's mass is inside its
    top K (nothing to spread), and its error bounded by the rest mass's term otherwise."""
    torch.manual_seed(1)
    V, K = 30, 6
    q = torch.randn(4, V).log_softmax(-1)
    p_sparse = torch.full((4, V), -30.0)
    p_sparse[:, :K] = torch.randn(4, K)
    p_sparse = p_sparse.log_softmax(-1)  # all but e^-30-ish of the mass in the first K ids
    top = p_sparse.topk(K, -1)
    est = dense_logprobs(top.indices, top.values, V)
    kl = lambda lq, lp: (lq.exp() * (lq - lp)).sum(-1)  # noqa: E731
    # outside the top K the estimate replaces log p ~ -30 by log(rest/(V-K)); the difference is small
    # in q-weighted terms only where q puts little mass there, so compare on a q living on the top K
    q_top = torch.full((4, V), -40.0)
    q_top[:, :K] = torch.randn(4, K)
    q_top = q_top.log_softmax(-1)
    torch.testing.assert_close(kl(q_top, est), kl(q_top, p_sparse), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(kl(q, est)).all()


# ---- the served teacher against the local one ---------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok, seed=3).eval()


@pytest.fixture(scope="module")
def server(tok, model):
    d = Double(model, tok)
    yield d
    d.close()


def served(server, tok, **kw):
    client = Client(server.url, "tiny", timeout_s=kw.pop("timeout_s", 30.0), retries=kw.pop("retries", 2))
    return ServedTeacher(None, tok, "tiny", vocab_size=len(tok), client=client, logprobs=kw.pop("logprobs", 8), **kw)


def rollout(tok):
    prompts = [tok("Say hi").input_ids, tok("A longer prompt").input_ids]
    responses = [tok("ok").input_ids + [tok.eos_token_id], tok("yes please do").input_ids]
    P, T = max(map(len, prompts)), max(map(len, responses))
    pad = tok.pad_token_id
    p_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    p_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    r_ids = torch.tensor([r + [pad] * (T - len(r)) for r in responses])
    r_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in responses])
    z = torch.zeros(2, T)
    return Rollout(p_ids, p_mask, r_ids, r_mask, z, z, z)


def test_preflight_accepts_the_right_server_and_names_what_is_wrong(server, tok):
    assert Client(server.url, "tiny").preflight(tok, 8, "tiny") == 512
    cases = [
        (Client(server.url, "other"), 8, tok, "teacher.served_model: the server at"),
        (Client(server.url, "tiny"), 50, tok, "--max-logprobs 50"),
        (Client(server.url, "tiny"), 8, make_bpe_tokenizer(), "its tokenizer does not match the served model's"),
    ]
    for client, k, t, words in cases:
        with pytest.raises(UserError) as e:
            client.preflight(t, k, "tiny")
        assert words in str(e.value) and "\n" not in str(e.value)


def test_served_rewards_equal_the_local_teachers(server, tok, model):
    local = Teacher(model, tok, "tiny", vocab_size=len(tok))
    ro = rollout(tok)
    ref, _ = local.response_logp(ro, (1.0, 0, 1.0), chunk=8)
    t = served(server, tok)
    got, ids, lps = t.response_logp_async(ro, (1.0, 0, 1.0), keep_topk=True).result()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert ids.shape == (2, ro.response_ids.shape[1], 9)
    # the top-k at each response position is the local teacher's top-k there
    full = local.response_logits(rollout_tensors(ro), len(tok)).log_softmax(-1)
    valid = ro.response_mask.bool()
    assert torch.equal(ids[..., 0][valid], full.argmax(-1)[valid])
    with pytest.raises(UserError, match="raw one"):
        t.response_logp_async(ro, (0.7, 0, 1.0))


def rollout_tensors(ro):
    return {f: getattr(ro, f) for f in ro.__dataclass_fields__ if getattr(ro, f) is not None}


def test_served_rewards_across_tokenizers_equal_the_local_teachers(server, tok, model):
    """Another student tokenizer: the teacher scores its own tokens of the text after its own prompt
    and the log-probs are credited to student tokens (``xtok.spread``), as the local teacher does."""
    student_tok = make_bpe_tokenizer()
    aligner = xtok.Aligner(tok, student_tok, "teacher", "student")
    local = Teacher(model, tok, "tiny", vocab_size=len(tok), student_tokenizer=student_tok, aligner=aligner)
    t = served(server, tok, student_tokenizer=student_tok, aligner=aligner)
    texts = ["the cat", "hello there"]
    rows = [student_tok(x, add_special_tokens=False).input_ids for x in texts]
    T = max(map(len, rows))
    r_ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    r_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    p = torch.ones(2, 1, dtype=torch.long)
    z = torch.zeros(2, T)
    ro = Rollout(p, p, r_ids, r_mask, z, z, z)
    t_prompts = [tok("Say hi").input_ids, tok("Q").input_ids]
    ref, _ = local.response_logp(ro, (1.0, 0, 1.0), chunk=8, teacher_prompts=t_prompts)
    got, _ = t.response_logp(ro, (1.0, 0, 1.0), chunk=8, teacher_prompts=t_prompts)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_served_distribution_is_the_local_top_k(server, tok, model):
    local = Teacher(model, tok, "tiny", vocab_size=len(tok))
    t = served(server, tok)
    rows = [tok("Name a fruit").input_ids, tok("Q").input_ids]
    W = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (W - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (W - len(r)) for r in rows])
    tr = t.logits(ids, mask)
    full = local.logits(ids, mask).log_softmax(-1)
    assert tr.indices.shape == (2, W - 1, 9)
    n0 = len(rows[0]) - 1
    top = full[0, :n0].topk(8, -1)
    assert torch.equal(tr.indices[0, :n0, :8], top.indices)
    torch.testing.assert_close(tr.logprobs[0, :n0, :8], top.values, rtol=0, atol=1e-5)
    pd = t.target(ids, 0.9, 4, vocab=len(tok))
    ref = truncate_raw(local.logits(ids, mask), 0.9, 4)
    assert torch.equal(pd.indices[0, :n0], ref.indices[0, :n0])
    with pytest.raises(UserError, match="teacher.logprobs"):
        t.target(ids, 0.9, 20, vocab=len(tok))


def test_generate_returns_ids_up_to_eos(server, tok, model):
    t = served(server, tok)
    out = t.generate([tok("Say hi").input_ids], {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "top_k": 0}, 0)
    seq = tok("Say hi").input_ids
    greedy = []
    for _ in range(6):
        with torch.no_grad():
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        greedy.append(nxt)
        seq.append(nxt)
    assert out == [greedy]


def test_a_failing_server_is_retried_then_named_in_one_line(server, tok):
    t = served(server, tok, retries=2)
    server.fail_next = 2  # two 500s, then an answer
    before = server.requests
    assert t.score([tok("hi there").input_ids])[0][0].shape == (len(tok("hi there").input_ids) - 1,)
    assert server.requests - before == 3
    server.fail_next = 10
    with pytest.raises(UserError) as e:
        t.score([tok("hi there").input_ids])
    server.fail_next = 0
    assert "no answer to /v1/completions after 3 tries" in str(e.value) and "resume=auto" in str(e.value)
    gone = Client("http://127.0.0.1:9", "tiny", timeout_s=1.0, retries=0)  # nothing listens on port 9
    with pytest.raises(UserError, match="no answer to /v1/models after 1 tries"):
        gone.preflight(tok, 8, "tiny")


def test_a_slow_answer_times_out_and_is_retried(server, tok):
    server.delay_s = 1.5
    try:
        t = served(server, tok, timeout_s=0.5, retries=0)
        with pytest.raises(UserError, match="no answer"):
            t.score([tok("hi").input_ids])
    finally:
        server.delay_s = 0.0


def test_check_stages_refuses_what_a_server_cannot_give():
    def cfg(stage_type, **kw):
        c = stage(stage_type).config(name=stage_type, type=stage_type, **kw)
        if hasattr(c, "validate"):
            c.validate(f"stages.{stage_type}")  # minillm: the preset fills mix_alpha
        return c

    ok = [cfg("sft"), cfg("kd", kind="fkl", kd_ratio=0.5), cfg("minillm", mix_alpha=0.0), cfg("pd", top_k=8)]
    check_stages(ok, stage, logprobs=20)
    bad = [
        (cfg("minillm"), "teacher-mixed sampling"),  # the preset's a = 0.2
        (cfg("kd", kind="rkl", kd_ratio=0.5), "needs the full teacher distribution"),
        (cfg("pd", top_k=50), "top_k 50"),
        (cfg("pd", top_k=0), "top_k 0"),
        (cfg("pd_store"), "pd_store keeps"),
        (cfg("evaluate"), "KL columns"),
    ]
    for c, words in bad:
        with pytest.raises(UserError) as e:
            check_stages([c], stage, logprobs=20)
        assert words in str(e.value) and f"stage '{c.name}'" in str(e.value) and "\n" not in str(e.value)


def test_single_step_reads_the_stored_top_k(server, tok):
    t = served(server, tok)
    batch = {"teacher_topk_ids": torch.tensor([[[3, 0]]]), "teacher_topk_logp": torch.tensor([[[0.0, NEG_INF]]])}
    d = t.response_logits(batch, len(tok))
    assert d.shape == (1, 1, len(tok)) and abs(float(d[0, 0, 3])) < 1e-6
    with pytest.raises(UserError, match="no teacher top-k"):
        t.response_logits({}, len(tok))
    assert t.lockstep() is None and t.served
