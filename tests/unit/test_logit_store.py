"""Offline logit store: round trip, identity checks, interrupted builds, sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minidistill.errors import UserError
from minidistill.functional.losses import NEG_INF, kept_mass, token_divergence, truncate_top_p_k
from minidistill.models import logit_store as LS


class TableTeacher:
    """A stand-in teacher: logits depend on the current and previous token (deterministic)."""

    def __init__(self, vocab: int, seed: int = 0, scale: float = 3.0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(vocab, vocab, generator=g) * scale if vocab <= 4096 else None
        self.emb = torch.randn(vocab, 16, generator=g)
        self.out = torch.randn(16, vocab, generator=g) * scale
        self.calls = 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:  # (b, T) -> (b, T, V)
        self.calls += 1
        prev = torch.roll(ids, 1, dims=1)
        return (self.emb[ids] + 0.5 * self.emb[prev]) @ self.out


def ident(blocks, vocab=300, top_p=0.9, top_k=8, **kw):
    base = dict(
        tokenizer_hash="tok123",
        vocab_size=vocab,
        block_len=blocks.shape[1],
        n_blocks=blocks.shape[0],
        corpus_fingerprint="fp",
        top_p=top_p,
        top_k=top_k,
    )
    base.update(kw)
    return LS.identity(**base)


def make_blocks(n=7, T=12, vocab=300, seed=1):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top_p,top_k,vocab", [(0.8, 6, 40), (1.0, 6, 40), (0.9, 50, 20)])
def test_truncate_raw_matches_truncate_top_p_k(top_p, top_k, vocab):
    z = torch.randn(2, 5, vocab, generator=torch.Generator().manual_seed(0)) * 3
    ref = truncate_top_p_k(z, top_p, top_k)
    raw = LS.truncate_raw(z, top_p, top_k)
    assert torch.equal(raw.indices, ref.indices)
    assert torch.equal(raw.logprobs == NEG_INF, ref.logprobs == NEG_INF)
    renorm = torch.log_softmax(raw.logprobs, -1)
    assert torch.allclose(
        torch.where(ref.logprobs > NEG_INF, renorm, 0.0),
        torch.where(ref.logprobs > NEG_INF, ref.logprobs, 0.0),
        atol=1e-6,
    )
    assert torch.allclose(raw.logprobs.logsumexp(-1).exp(), kept_mass(z, ref), atol=1e-6)


@pytest.mark.parametrize("vocab,dtype", [(300, np.uint16), (70000, np.uint32)])
def test_round_trip_reproduces_truncated_distributions(tmp_path, vocab, dtype):
    blocks = make_blocks(n=7, T=6 if vocab > 4096 else 12, vocab=vocab)
    teacher = TableTeacher(vocab)
    header = LS.build_store(
        tmp_path / "s", blocks, teacher, ident(blocks, vocab=vocab), batch_size=2, shard_blocks=3, log=lambda m: None
    )
    assert header["n_shards"] == 3 and header["index_dtype"] == np.dtype(dtype).name
    store = LS.LogitStore(tmp_path / "s")
    order = [6, 0, 3, 2, 5]  # across shards, shuffled
    idx, lp = store.get(order)
    assert idx.dtype == dtype and lp.dtype == np.float16 and idx.shape == (5, blocks.shape[1] - 1, 8)
    ref = truncate_top_p_k(teacher(blocks[order])[:, :-1], 0.9, 8)
    kept = ref.logprobs > NEG_INF
    assert np.array_equal(idx, ref.indices.numpy())
    got = torch.log_softmax(torch.from_numpy(lp).float(), -1)  # renormalised over the kept set
    assert torch.equal(got > NEG_INF, kept)
    assert torch.allclose(got[kept], ref.logprobs[kept], atol=2e-3, rtol=2e-3)  # fp16 precision
    # the stored raw log-probs carry the teacher's kept mass
    z = teacher(blocks[order])[:, :-1]
    assert torch.allclose(torch.from_numpy(lp).float().logsumexp(-1).exp(), kept_mass(z, ref), atol=2e-3)
    # the loss computed from the store equals the one from the exact truncation
    s = torch.randn(5, blocks.shape[1] - 1, vocab, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(s.shape[:2], dtype=torch.bool)
    exact, _ = token_divergence(s, ref, mask, "fkl", temperature=0.7)
    stored, _ = token_divergence(s, store.truncated(order), mask, "fkl", temperature=0.7)
    assert float(stored) == pytest.approx(float(exact), rel=2e-3)
    # 2 + 2 bytes per slot with uint16 ids (plus the .npy headers)
    per_slot = 2 + np.dtype(dtype).itemsize
    positions = 7 * (blocks.shape[1] - 1)
    assert per_slot * 8 <= store.bytes_per_token <= per_slot * 8 + 3 * 2 * 128 / positions


def test_padding_slots_when_top_p_cuts(tmp_path):
    blocks = make_blocks()
    LS.build_store(
        tmp_path / "s", blocks, TableTeacher(300, scale=8.0), ident(blocks, top_p=0.5, top_k=8), log=lambda m: None
    )
    store = LS.LogitStore(tmp_path / "s")
    idx, lp = store.get(range(7))
    pad = np.isneginf(lp)
    assert pad.any() and (idx[pad] == 0).all() and not pad[..., 0].any()
    assert store.header["stats"]["mean_kept"] < 8


def test_check_refuses_mismatches(tmp_path):
    blocks = make_blocks()
    LS.build_store(tmp_path / "s", blocks, TableTeacher(300), ident(blocks), log=lambda m: None)
    store = LS.LogitStore(tmp_path / "s")
    good = {k: store.header[k] for k in LS.CHECKED}
    store.check(good)
    for key, value in [
        ("tokenizer_hash", "other"),
        ("block_len", 16),
        ("corpus_fingerprint", "abc"),
        ("top_k", 50),
        ("top_p", 0.95),
        ("n_blocks", 8),
        ("vocab_size", 301),
    ]:
        with pytest.raises(UserError) as e:
            store.check(dict(good, **{key: value}))
        msg = str(e.value)
        assert "\n" not in msg and key in msg and str(tmp_path / "s") in msg
        assert repr(store.header[key]) in msg and repr(value) in msg


def test_tokenizer_hash():
    from tiny_tokenizer import make_tokenizer

    a, b = make_tokenizer(), make_tokenizer()
    assert LS.tokenizer_hash(a) == LS.tokenizer_hash(b)
    b.add_tokens(["<extra>"])
    assert LS.tokenizer_hash(a) != LS.tokenizer_hash(b)


def test_interrupted_build_continues_and_complete_store_is_reused(tmp_path):
    blocks = make_blocks(n=9)
    full = LS.build_store(
        tmp_path / "ref", blocks, TableTeacher(300), ident(blocks), batch_size=3, shard_blocks=3, log=lambda m: None
    )

    class Crash(Exception):
        pass

    teacher = TableTeacher(300)

    def crashing(ids):
        if teacher.calls == 2:  # one forward per shard: shards 0 and 1 written, crash in shard 2
            raise Crash
        return teacher(ids)

    folder = tmp_path / "s"
    with pytest.raises(Crash):
        LS.build_store(folder, blocks, crashing, ident(blocks), batch_size=3, shard_blocks=3, log=lambda m: None)
    assert (folder / "plan.json").is_file() and not (folder / "header.json").exists()
    with pytest.raises(UserError, match="incomplete"):
        LS.LogitStore(folder)
    teacher.calls = 0
    LS.build_store(folder, blocks, teacher, ident(blocks), batch_size=3, shard_blocks=3, log=lambda m: None)
    assert teacher.calls == 1  # only shard 2
    a, b = LS.LogitStore(folder).get(range(9)), LS.LogitStore(tmp_path / "ref").get(range(9))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert LS.LogitStore(folder).header["stats"] == full["stats"]
    teacher.calls = 0
    LS.build_store(folder, blocks, teacher, ident(blocks), batch_size=3, shard_blocks=3, log=lambda m: None)
    assert teacher.calls == 0  # complete: reused
    LS.build_store(folder, blocks, teacher, ident(blocks, top_k=4), batch_size=3, shard_blocks=3, log=lambda m: None)
    assert teacher.calls == 3 and LS.LogitStore(folder).header["top_k"] == 4  # other settings: rebuilt
    # on_partial='rebuild' starts over
    (folder / "header.json").unlink()
    teacher.calls = 0
    LS.build_store(
        folder,
        blocks,
        teacher,
        ident(blocks, top_k=4),
        batch_size=3,
        shard_blocks=3,
        on_partial="rebuild",
        log=lambda m: None,
    )
    assert teacher.calls == 3


def test_damaged_store_is_refused(tmp_path):
    blocks = make_blocks()
    LS.build_store(tmp_path / "s", blocks, TableTeacher(300), ident(blocks), log=lambda m: None)
    f = tmp_path / "s" / "shard_00000.logprobs.npy"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        LS.LogitStore(tmp_path / "s")
    with pytest.raises(UserError, match="not found"):
        LS.LogitStore(tmp_path / "nowhere")
    h = json.loads((tmp_path / "s" / "header.json").read_text())
    assert h["padding"] == {"index": 0, "logprob": "-inf"} and h["logprob_dtype"] == "float16"
    assert h["positions_per_block"] == blocks.shape[1] - 1 and h["temperature"] == 1.0


def test_offline_store_needs_top_k():
    with pytest.raises(UserError, match="top_k"):
        LS.identity(
            tokenizer_hash="t", vocab_size=10, block_len=8, n_blocks=1, corpus_fingerprint="f", top_p=0.9, top_k=0
        )
