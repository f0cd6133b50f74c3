"""minidistill.parts.scoring (the one scorer of a model against its teacher) and evaluation.Sampling /
sample_ids (the one generate_ids call): pure helpers against hand-computed values, the scorer
against the analysis primitives it is built from."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_tokenizer import make_tokenizer, tiny_llama  # noqa: E402

from minidistill.data import Example  # noqa: E402
from minidistill.generation.evaluation import Sampling, decode, generate_ids, rouge_l, sample_ids  # noqa: E402
from minidistill.parts import scoring  # noqa: E402
from minidistill.reporting import analysis as A  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def student(tok):
    return tiny_llama(tok, seed=0)


@pytest.fixture(scope="module")
def teacher(tok):
    m = tiny_llama(tok, seed=1)
    with torch.no_grad():
        m.get_input_embeddings().weight.mul_(8.0)
    return m


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in ("Hello there", "A", "Once upon a time")]


# ------------------------------------------------------------------ pure helpers


def test_pooled_kl_eos_rate_mean_length():
    assert scoring.pooled_kl([[1.0, 2.0], [], [3.0]]) == pytest.approx(2.0)  # (1 + 2 + 3) / 3 steps
    assert scoring.pooled_kl([[0.5], [1.5, 1.0]]) == pytest.approx(1.0)  # per token, not per sequence
    assert scoring.pooled_kl([]) == 0.0
    assert scoring.eos_rate([True, False, True, True]) == 0.75 and scoring.eos_rate([]) == 0.0
    assert scoring.mean_length([[1, 2, 3], [4]]) == 2.0 and scoring.mean_length([]) == 0.0


def test_mean_by_seed_and_select():
    assert scoring.mean_by_seed([1.0, 3.0, 10.0, 20.0], [20, 20, 10, 10]) == {20: 2.0, 10: 15.0}
    assert list(scoring.mean_by_seed([1.0, 2.0], [5, 4])) == [5, 4]  # order of first appearance
    with pytest.raises(ValueError):
        scoring.mean_by_seed([1.0], [1, 2])
    s = A.Samples([0, 1, 2], [7, 7, 7], [[1], [2, 3], []], [True, False, True], [[0.1], [], [0.2]], [[0.3], [], [0.4]])
    picked = scoring.select(s, [2, 0])
    assert picked.prompt_index == [2, 0] and picked.responses == [[], [1]] and picked.fkl == [[0.4], [0.3]]
    picked.rkl[0] = [9.0]
    assert s.rkl[2] == [0.2]  # a new list per field: the original is untouched


def test_with_eos():
    assert A.with_eos([[5, 6], [7]], [True, False], eos=0) == [[5, 6, 0], [7]]


# ------------------------------------------------------------------ one generate call


def test_sample_ids_is_generate_ids_with_the_settings(student, tok, prompts):
    settings = Sampling(max_new_tokens=5, batch_size=2, top_k=7, no_repeat_ngram_size=2, progress=False, vocab_size=40)
    direct = generate_ids(
        student,
        tok,
        prompts,
        max_new_tokens=5,
        batch_size=2,
        top_k=7,
        no_repeat_ngram_size=2,
        seed=3,
        progress=False,
        vocab_size=40,
    )
    assert sample_ids(student, tok, prompts, settings, seed=3) == direct
    assert all(t < 40 for r in direct for t in r)


# ------------------------------------------------------------------ the scorer


def test_score_model_against_the_analysis_primitives(student, teacher, tok, prompts):
    sampling = Sampling(max_new_tokens=6, batch_size=2, progress=False)
    refs = ["hello", ["a", "b"], "once"]
    vocab = len(tok)
    t = scoring.score_model(teacher, teacher, vocab, tok, prompts, sampling=sampling, seeds=[1, 2])
    # the teacher against itself: KL 0 at every scored step (response + EOS when it stopped)
    assert t.reverse_kl == 0.0 and t.forward_kl is None and t.rouge is None
    assert [len(x) for x in t.samples.rkl] == [len(r) + e for r, e in zip(t.samples.responses, t.samples.ended)]
    sc = scoring.score_model(
        student,
        teacher,
        vocab,
        tok,
        prompts,
        sampling=sampling,
        seeds=[1, 2],
        references=refs,
        teacher_samples=t.samples,
        kl_seeds=[2],
    )
    own = sc.samples
    assert own.seed == [1, 1, 1, 2, 2, 2] and own.prompt_index == [0, 1, 2, 0, 1, 2]
    # the samples are the generate_ids samples with the same settings, per seed
    for seed in (1, 2):
        got = [r for r, s in zip(own.responses, own.seed) if s == seed]
        assert got == sample_ids(student, tok, prompts, Sampling(6, 2, progress=False, vocab_size=vocab), seed)
    assert sc.texts == decode(tok, own.responses)
    assert sc.rouge == [rouge_l(x, refs[i]) for x, i in zip(sc.texts, own.prompt_index)]
    assert sc.rouge_l == pytest.approx(sum(sc.rouge) / 6)
    assert sc.eos_rate == sum(own.ended) / 6 and sc.mean_length == sum(len(r) for r in own.responses) / 6
    # KLs only on the KL seed's own samples; equal to response_kl on them (EOS appended where it stopped)
    assert all(x == [] for x, s in zip(own.rkl, own.seed) if s == 1)
    second = [k for k, s in enumerate(own.seed) if s == 2]
    direct = A.response_kl(
        student,
        teacher,
        [prompts[own.prompt_index[k]] for k in second],
        A.with_eos([own.responses[k] for k in second], [own.ended[k] for k in second], tok.eos_token_id),
        pad_id=tok.pad_token_id,
        batch_size=2,
        vocab_size=vocab,
    )
    assert sc.reverse_kl == pytest.approx(direct["reverse_kl"]) and sc.reverse_kl > 0
    # forward KL on every one of the teacher's samples, one pass per seed; the teacher's Samples are not modified
    assert sc.teacher_samples.responses == t.samples.responses and t.samples.fkl[0] == [0.0] * len(t.samples.fkl[0])
    first = [k for k, s in enumerate(t.samples.seed) if s == 1]
    on_teacher = A.response_kl(
        student,
        teacher,
        [prompts[t.samples.prompt_index[k]] for k in first],
        A.with_eos([t.samples.responses[k] for k in first], [t.samples.ended[k] for k in first], tok.eos_token_id),
        pad_id=tok.pad_token_id,
        batch_size=2,
        vocab_size=vocab,
    )
    got = [x for k in first for x in sc.teacher_samples.fkl[k]]
    assert got == pytest.approx([x for _, f in on_teacher["per_sequence"] for x in f])
    assert sc.forward_kl > 0
    # no teacher: ROUGE-L, length and EOS rate only
    alone = scoring.score_model(student, None, vocab, tok, prompts, sampling=sampling, seeds=[1], references=refs)
    assert alone.reverse_kl is None and alone.forward_kl is None and alone.rouge == sc.rouge[:3]


def test_gold_kl(student, teacher, tok):
    examples = [Example("Say hi", "", ["hi"]), Example("Repeat", "abc", ["abc"])]
    res, p, r = scoring.gold_kl(
        student,
        teacher,
        len(tok),
        tok,
        examples,
        template="alpaca",
        max_prompt_length=224,
        max_length=288,
        batch_size=2,
    )
    assert len(p) == len(r) == 2 and "per_sequence" not in res
    assert r[0][-1] == tok.eos_token_id  # the gold response + EOS
    direct = A.response_kl(student, teacher, p, r, pad_id=tok.pad_token_id, batch_size=2, vocab_size=len(tok))
    assert res["reverse_kl"] == pytest.approx(direct["reverse_kl"]) and res["n_tokens"] == sum(len(x) for x in r)
    assert res["forward_kl"] > 0
