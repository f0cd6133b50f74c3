"""Cross-tokenizer distillation (minidistill.functional.xtok) against brute-force references on toy tokenizers:
character spans, the span alignment, the credit map and the spread reward, the shared vocabulary,
ULD (sorted W1) and the hybrid loss, and the refusals."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from tiny_tokenizer import make_bpe_tokenizer, make_sp_tokenizer, make_tokenizer

from minidistill.errors import UserError
from minidistill.functional import xtok
from minidistill.functional.losses import forward_kl

TOKENIZERS = {"bytes": make_tokenizer, "bpe": make_bpe_tokenizer, "sp": make_sp_tokenizer}
ALPHABET = ["t", "h", "e", " ", "a", "c", "o", "n", "s", "é", "数", "🙂", "\n", ",", "r", "l"]


@pytest.fixture(scope="module")
def toks():
    return {k: f() for k, f in TOKENIZERS.items()}


def texts(n: int = 25, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["the cat sat on the mat", "é🙂 数数 , then", " the other", "a"]
    for _ in range(n):
        out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 18))))
    return out


def ids_of(tok, text: str, eos: bool = True) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"]) + ([tok.eos_token_id] if eos else [])


def brute_ends(tok, ids: list[int]) -> list[int]:
    """Character end of each token from the tokenizer's own decode: the length of the longest
    prefix ids[:m], m <= k+1, that decodes to a prefix of the document's text (a prefix cut inside a
    character does not: it decodes to U+FFFD); EOS is one character."""
    ends, base, seg = [], 0, []
    docs, cur = [], []
    for t in ids:  # each document's full text, to test prefixes against
        if t == tok.eos_token_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    docs.append(cur)
    doc = 0
    for t in ids:
        if t == tok.eos_token_id:
            base += len(tok.decode(seg, skip_special_tokens=True)) + 1
            seg, doc = [], doc + 1
            ends.append(base)
            continue
        seg.append(t)
        full = tok.decode(docs[doc], skip_special_tokens=True)
        m = len(seg)
        while m > 0 and not full.startswith(tok.decode(seg[:m], skip_special_tokens=True)):
            m -= 1
        ends.append(base + len(tok.decode(seg[:m], skip_special_tokens=True)))
    return ends


def brute_starts(ends: list[int]) -> list[int]:
    return [0] + ends[:-1]


# ---------------------------------------------------------------- spans and alignment


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_spans_match_the_tokenizers_own_decoding(toks, name):
    tok = toks[name]
    tt = xtok.TokenText(tok, name)
    for text in texts():
        ids = ids_of(tok, text)
        sp = tt.spans(ids)
        assert sp.ends == brute_ends(tok, ids), text
        assert sp.starts == brute_starts(sp.ends)
        assert sp.pieces[0] == text and sp.eos_after[0]


def test_partial_characters_have_zero_width_and_the_completing_token_covers_them(toks):
    tt = xtok.TokenText(toks["sp"], "sp")
    ids = ids_of(toks["sp"], "a🙂", eos=False)
    assert toks["sp"].convert_ids_to_tokens(ids) == ["a", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    sp = tt.spans(ids)
    assert sp.starts == [0, 1, 1, 1, 1] and sp.ends == [1, 1, 1, 1, 2]


@pytest.mark.parametrize("student,teacher", list(itertools.permutations(TOKENIZERS, 2)))
def test_pairs_are_the_tokens_starting_at_the_same_character(toks, student, teacher):
    al = xtok.Aligner(toks[teacher], toks[student], teacher, student)
    for text in texts():
        s_ids = ids_of(toks[student], text)
        view = al.teacher_view(s_ids)
        # the teacher reads the same text in its own tokenization
        assert view.ids == ids_of(toks[teacher], text)
        s_start, t_start = (
            brute_starts(brute_ends(toks[student], s_ids)),
            brute_starts(brute_ends(toks[teacher], view.ids)),
        )
        expect = []
        for i, a in enumerate(s_start):
            if a in s_start[:i]:
                continue
            if a in t_start:
                expect.append((i, t_start.index(a)))
        assert list(zip(view.student_pairs, view.teacher_pairs)) == expect, text
        # EOS pairs with EOS, the first tokens with each other
        assert (len(s_ids) - 1, len(view.ids) - 1) in expect and expect[0] == (0, 0)


@pytest.mark.parametrize("student,teacher", list(itertools.permutations(TOKENIZERS, 2)))
def test_credit_goes_to_the_student_token_completing_the_teacher_tokens_last_character(toks, student, teacher):
    al = xtok.Aligner(toks[teacher], toks[student], teacher, student)
    for text in texts():
        s_ids = ids_of(toks[student], text)
        view = al.teacher_view(s_ids)
        s_end, t_end = brute_ends(toks[student], s_ids), brute_ends(toks[teacher], view.ids)
        t_start = brute_starts(t_end)
        for j in range(len(view.ids)):
            k = j
            while k < len(view.ids) and t_end[k] == t_start[k]:  # zero width: goes with the completing token
                k += 1
            last = t_end[k] - 1
            expect = next(i for i, e in enumerate(s_end) if e > last)
            assert view.credit[j] == expect, (text, j)


def test_spread_sums_to_the_teacher_sequence_logprob(toks):
    al = xtok.Aligner(toks["sp"], toks["bpe"], "sp", "bpe")
    g = torch.Generator().manual_seed(0)
    for text in texts(10):
        s_ids = ids_of(toks["bpe"], text)
        view = al.teacher_view(s_ids)
        lp = -torch.rand((1, len(view.ids)), generator=g, dtype=torch.float64)
        credit = torch.tensor([view.credit])
        out = xtok.spread(
            torch.cat([lp, torch.zeros(1, 3, dtype=torch.float64)], 1), F.pad(credit, (0, 3), value=-1), len(s_ids)
        )
        assert out.shape == (1, len(s_ids))
        assert float(out.sum()) == pytest.approx(float(lp.sum()), abs=1e-12)
        for i in range(len(s_ids)):  # brute force: sum of the teacher tokens credited to i
            ref = sum(float(lp[0, j]) for j in range(len(view.ids)) if view.credit[j] == i)
            assert float(out[0, i]) == pytest.approx(ref, abs=1e-12)


def test_a_text_split_at_eos_is_encoded_piece_by_piece(toks):
    al = xtok.Aligner(toks["sp"], toks["bytes"], "sp", "bytes")
    s_ids = ids_of(toks["bytes"], "the cat") + ids_of(toks["bytes"], "on a mat", eos=False)
    view = al.teacher_view(s_ids)
    assert view.ids == ids_of(toks["sp"], "the cat") + ids_of(toks["sp"], "on a mat", eos=False)
    eos_s, eos_t = s_ids.index(toks["bytes"].eos_token_id), view.ids.index(toks["sp"].eos_token_id)
    assert (eos_s, eos_t) in zip(view.student_pairs, view.teacher_pairs)
    assert (eos_s + 1, eos_t + 1) in zip(view.student_pairs, view.teacher_pairs)  # the next document's start


def test_shared_vocabulary_matches_tokens_by_their_bytes(toks):
    s, t = xtok.TokenText(toks["bpe"], "bpe"), xtok.TokenText(toks["sp"], "sp")
    shared = xtok.shared_vocab(s, t)
    pairs = dict(zip(shared.teacher.tolist(), shared.student.tolist()))
    sp_id = toks["sp"].convert_tokens_to_ids("▁the")
    assert sp_id in pairs and toks["bpe"].convert_ids_to_tokens(pairs[sp_id]) == "Ġthe"  # the space markers
    assert pairs[toks["sp"].eos_token_id] == toks["bpe"].eos_token_id
    # brute force: every pair spells the same bytes; every other byte string held once by each side is paired
    for ti, si in pairs.items():
        if ti != t.eos:
            assert t.bytes[ti] == s.bytes[si] and t.bytes[ti]
    common = {b for b in s.bytes if b and s.bytes.count(b) == 1} & {b for b in t.bytes if b and t.bytes.count(b) == 1}
    assert len(pairs) == len(common) + 1
    # the byte-fallback token <0x41> and "A" spell the same byte: b"A" is not unique on the sp side
    assert b"A" not in {t.bytes[i] for i in pairs}


# ---------------------------------------------------------------- losses


def brute_min_l1(p: list[float], q: list[float]) -> float:
    """min over every bijection between the two (zero-padded) vocabularies of sum |p_v - q_pi(v)|."""
    w = max(len(p), len(q))
    p, q = p + [0.0] * (w - len(p)), q + [0.0] * (w - len(q))
    return min(sum(abs(a - q[k]) for a, k in zip(p, perm)) for perm in itertools.permutations(range(w)))


def test_uld_is_the_cheapest_matching_of_the_two_vocabularies():
    g = torch.Generator().manual_seed(0)
    for vt, vs in [(4, 4), (5, 3), (3, 6)]:
        lp = torch.log_softmax(3 * torch.randn(6, vt, generator=g, dtype=torch.float64), -1)
        lq = torch.log_softmax(3 * torch.randn(6, vs, generator=g, dtype=torch.float64), -1)
        d = xtok.uld(lq, lp)
        for n in range(6):
            assert float(d[n]) == pytest.approx(brute_min_l1(lp[n].exp().tolist(), lq[n].exp().tolist()), abs=1e-12)
        assert torch.all(xtok.uld(lp, lp) == 0) if vt == vs else True


def test_uld_top_k_is_exact_against_a_truncated_side_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(2 * torch.randn(20, 7, generator=g, dtype=torch.float64), -1)
    lq = torch.log_softmax(2 * torch.randn(20, 9, generator=g, dtype=torch.float64), -1)
    exact = xtok.uld(lq, lp)
    for k in (1, 3, 5):
        approx = xtok.uld(lq, lp, top_k=k)
        p, q = lp.exp(), lq.exp()
        p_rest = p.sum(-1) - p.topk(k, -1).values.sum(-1)
        q_rest = q.sum(-1) - q.topk(k, -1).values.sum(-1)
        assert torch.all(approx <= exact + 1e-12)
        assert torch.all(exact - approx <= 2 * torch.minimum(p_rest, q_rest) + 1e-12)
        # a teacher with at most k tokens (a truncated target): exact
        kept = torch.full_like(lp, float("-inf")).scatter(-1, lp.topk(k, -1).indices, lp.topk(k, -1).values)
        kept = kept - kept.logsumexp(-1, keepdim=True)
        assert torch.allclose(xtok.uld(lq, kept, top_k=k), xtok.uld(lq, kept), atol=1e-12)
    assert torch.allclose(xtok.uld(lq, lp, top_k=9), exact)


def brute_hybrid(lq: list[float], lp: list[float], pairs: list[tuple[int, int]], wm: float, wu: float) -> float:
    p, q = [math.exp(x) for x in lp], [math.exp(x) for x in lq]
    pa = [p[t] for s, t in pairs]
    qa = [q[s] for s, t in pairs]
    kl = 0.0
    if sum(pa) > 0:
        kl = sum(a / sum(pa) * math.log((a / sum(pa)) / (b / sum(qa))) for a, b in zip(pa, qa) if a > 0)
    pu = [p[v] for v in range(len(p)) if v not in {t for _, t in pairs}]
    qu = [q[v] for v in range(len(q)) if v not in {s for s, _ in pairs}]
    return wm * kl + wu * brute_min_l1(pu, qu)


def test_hybrid_against_brute_force():
    g = torch.Generator().manual_seed(2)
    lp = torch.log_softmax(2 * torch.randn(5, 6, generator=g, dtype=torch.float64), -1)
    lq = torch.log_softmax(2 * torch.randn(5, 5, generator=g, dtype=torch.float64), -1)
    pairs = [(0, 3), (2, 1), (4, 0)]  # (student id, teacher id)
    shared = xtok.SharedVocab(torch.tensor([s for s, _ in pairs]), torch.tensor([t for _, t in pairs]))
    d = xtok.hybrid(lq, lp, shared, matched_weight=0.7, unmatched_weight=1.3)
    for n in range(5):
        ref = brute_hybrid(lq[n].tolist(), lp[n].tolist(), pairs, 0.7, 1.3)
        assert float(d[n]) == pytest.approx(ref, abs=1e-10)


def test_hybrid_with_one_vocabulary_is_forward_kl():
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(4, 8, generator=g, dtype=torch.float64), -1)
    lq = torch.log_softmax(torch.randn(4, 8, generator=g, dtype=torch.float64), -1)
    ids = torch.randperm(8, generator=g)
    same = xtok.SharedVocab(ids, ids)
    assert torch.allclose(xtok.hybrid(lq, lp, same), forward_kl(lq, lp), atol=1e-12)
    # ids permuted between the two sides: the KL of the matched tokens
    perm = torch.randperm(8, generator=g)
    lq_perm = torch.empty_like(lq)
    lq_perm[:, perm] = lq
    assert torch.allclose(xtok.hybrid(lq_perm, lp, xtok.SharedVocab(perm, torch.arange(8))), forward_kl(lq, lp))


def test_hybrid_gives_no_matched_term_where_the_teacher_has_no_shared_mass():
    lp = torch.log(torch.tensor([[0.0, 0.0, 0.6, 0.4]], dtype=torch.float64))
    lq = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64), -1)
    shared = xtok.SharedVocab(torch.tensor([0, 1]), torch.tensor([0, 1]))
    d = xtok.hybrid(lq, lp, shared)
    assert torch.isfinite(d).all()
    assert float(d[0]) == pytest.approx(brute_min_l1([0.6, 0.4], [float(lq[0, 2].exp())]), abs=1e-12)


@pytest.mark.parametrize("kind", xtok.ULD_KINDS)
def test_divergence_sum_chunked_tempered_and_with_gradient(kind):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(11, 7, generator=g, requires_grad=True)
    t = torch.randn(11, 9, generator=g)
    shared = xtok.SharedVocab(torch.tensor([0, 1, 2]), torch.tensor([4, 0, 8]))
    ref_fn = xtok.uld if kind == "uld" else lambda q, p: xtok.hybrid(q, p, shared)
    for tau, st in [(1.0, False), (2.0, False), (2.0, True)]:
        got = xtok.divergence_sum(s, t, kind, shared=shared, temperature=tau, student_temperature=st, chunk_size=4)
        q = F.log_softmax(s / tau if st else s, -1)
        ref = ref_fn(q, F.log_softmax(t / tau, -1)).sum() * (tau**2 if st else 1)
        assert torch.allclose(got, ref, atol=1e-5)
        by_fn = xtok.divergence_sum(s, lambda a, b: t[a:b], kind, shared=shared, temperature=tau, chunk_size=3)
        assert torch.allclose(by_fn, xtok.divergence_sum(s, t, kind, shared=shared, temperature=tau), atol=1e-5)
    got.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    empty = xtok.divergence_sum(s[:0], t[:0], kind, shared=shared)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


# ---------------------------------------------------------------- refusals


def test_a_tokenizer_without_byte_fallback_is_refused_naming_the_model(toks):
    with pytest.raises(UserError) as e:
        xtok.Aligner(make_sp_tokenizer(byte_fallback=False), toks["bpe"], "teacher.model 'x/no-fallback'", "s")
    msg = str(e.value)
    assert "teacher.model 'x/no-fallback'" in msg and "no byte fallback" in msg and "\n" not in msg


def test_a_tokenizer_whose_tokens_do_not_spell_the_text_is_refused(toks):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(["the", "cat", "Hello,", "world!"])}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # spaces are dropped: no way back to the text
    words = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(UserError, match="student.model 'words': its tokenizer cannot be aligned"):
        xtok.Aligner(toks["bpe"], words, "t", "student.model 'words'")


def test_a_tokenizer_without_eos_is_refused(toks):
    tok = make_bpe_tokenizer()
    tok.eos_token = None
    with pytest.raises(UserError, match="'no-eos'.*no eos_token"):
        xtok.TokenText(tok, "'no-eos'")
