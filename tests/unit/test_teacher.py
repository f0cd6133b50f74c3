"""minidistill.teacher: the one interface every stage talks to. What a teacher gives (the same
numbers as a direct forward), what it refuses (one line, naming the teacher), and how it is paired
with the student's tokenizer for a recipe's stages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_tokenizer import make_bpe_tokenizer, make_tokenizer, tiny_llama

from minidistill.errors import UserError
from minidistill.functional import xtok
from minidistill.models import logits as fwd
from minidistill.stages import stage
from minidistill.teacher import StoredTeacher, Teacher, as_teacher, check_stages


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok, seed=3).eval()


def ids_of(tok, texts):
    rows = [tok(t).input_ids for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def test_same_tokenizer_teacher_gives_the_direct_forward(tok, model):
    t = Teacher(model, tok, "tiny", vocab_size=len(tok))
    ids, mask = ids_of(tok, ["Name a fruit", "Q"])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    got = t.logits(ids, mask)
    assert not got.requires_grad and torch.equal(got, ref)
    assert t.lockstep() is model and not t.cross
    blocks = t.block_logits(ids, vocab=len(tok))
    assert blocks.shape == (2, ids.shape[1], len(tok))


def test_target_truncates_like_the_store(tok, model):
    t = Teacher(model, tok, "tiny", vocab_size=len(tok))
    ids, _ = ids_of(tok, ["Spell dog backwards", "An animal"])
    full = t.target(ids, 0.9, 0, vocab=len(tok))
    assert isinstance(full, torch.Tensor) and full.shape[:2] == (2, ids.shape[1] - 1)
    tr = t.target(ids, 0.9, 5, vocab=len(tok))
    assert tr.indices.shape == (2, ids.shape[1] - 1, 5)
    top = full.log_softmax(-1).topk(1, -1)
    assert torch.equal(tr.indices[..., 0], top.indices[..., 0])  # the most likely token is always kept


def test_a_teacher_with_another_tokenizer_refuses_what_it_cannot_give(tok, model):
    other = make_bpe_tokenizer()
    t = Teacher(model, tok, "big/teacher", student_tokenizer=other)
    assert t.cross
    ids, mask = ids_of(tok, ["hi"])
    for call, what in [
        (lambda: t.lockstep(), "teacher-mixed sampling"),
        (lambda: t.logits(ids, mask), "full distribution"),
        (lambda: t.response_logits({}, 10), "full distribution"),
    ]:
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "big/teacher" in msg and what in msg


def test_the_offline_store_holds_training_blocks_only():
    store = SimpleNamespace(folder="runs/x/store", truncated=lambda idx, dev: ("kept", list(idx)))
    t = StoredTeacher(store)
    assert t.target(None, 0.95, 50, 10, block_idx=[3, 1]) == ("kept", [3, 1])
    with pytest.raises(UserError, match="runs/x/store"):
        t.target(torch.zeros(1, 4, dtype=torch.long), 0.95, 50, 10)


def test_as_teacher_wraps_a_bare_model_only(tok, model):
    t = as_teacher(model)
    assert isinstance(t, Teacher) and t.model is model and not t.cross
    assert as_teacher(t) is t and as_teacher(None) is None


def cfg(type_, **kw):
    return SimpleNamespace(type=type_, name=type_, **kw)


def test_pairing_asks_every_stage(tok, model):
    # one tokenizer: no aligner unless a stage asks for a loss over spans
    t = Teacher(model, tok, "tiny")
    check_stages(t, None, [cfg("sft")], "student", stage)
    assert t.aligner is None
    kd = stage("kd").config(type="kd", kind="uld", kd_ratio=0.5)
    kd.name = "kd"
    check_stages(t, None, [kd], "student", stage)
    assert t.aligner is not None and not t.cross
    # another tokenizer: refused in one line by the first stage that cannot use it ...
    other = make_bpe_tokenizer()
    t2 = Teacher(model, tok, "tiny")
    fkl = stage("kd").config(type="kd", kind="fkl", kd_ratio=0.5)
    fkl.name = "kd_fkl"
    with pytest.raises(UserError, match=r"stage 'kd_fkl' compares kind 'fkl' over one vocabulary"):
        check_stages(t2, other, [fkl], "student/x", stage)
    # ... or when no stage asks for it at all
    with pytest.raises(UserError, match="needs the same tokenizer, or a cross-tokenizer setting"):
        check_stages(t2, other, [cfg("sft")], "student/x", stage)
    # allowed when every stage can: the teacher keeps its tokenizer and aligns through text
    check_stages(t2, other, [kd], "student/x", stage)
    assert t2.cross and t2.student_tokenizer is other and isinstance(t2.aligner, xtok.Aligner)


def test_the_shared_vocabulary_has_one_set_of_limits(tok, model):
    t = Teacher(model, tok, "tiny", aligner=xtok.Aligner(tok, tok, "t", "s"))
    student_vocab = t.check_vocab(model, len(tok))
    assert student_vocab == len(tok) and t.vocab_size == len(tok)
    assert t.shared() is t.aligner.shared()  # later calls without limits get the same map
    with pytest.raises(ValueError, match="already built"):
        t.aligner.shared(len(tok) - 1, len(tok))


def test_response_logits_rebuild_from_kept_hidden_states(tok, model):
    t = Teacher(model, tok, "tiny", vocab_size=len(tok))
    p_ids, p_mask = ids_of(tok, ["Say hi", "A longer prompt here"])
    p_ids, p_mask = p_ids.flip(1), p_mask.flip(1)  # left-padded prompts
    r_ids, r_mask = ids_of(tok, ["ok", "yes please"])
    batch = {"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids, "response_mask": r_mask}
    direct = t.response_logits(batch, len(tok))
    with torch.no_grad():
        hidden = fwd.response_hidden(model, p_ids, p_mask, r_ids, r_mask)
    cached = t.response_logits({**batch, "teacher_hidden": hidden}, len(tok))
    valid = r_mask.bool()
    torch.testing.assert_close(cached[valid], direct[valid], rtol=1e-5, atol=1e-5)
