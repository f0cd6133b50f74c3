"""Offline teacher logits: truncated teacher distributions over a packed corpus, on disk.

Layout of a store folder (written by the ``pd_store`` stage, read by ``pd`` with
``teacher_logits: offline``)::

    plan.json                  what is being built (written first; lets an interrupted build continue)
    shard_00000.indices.npy    (n, P, K) token ids, uint16 if vocab <= 65535 else uint32
    shard_00000.logprobs.npy   (n, P, K) float16 teacher log-probs at tau = 1
    shard_00000.json           the shard's sizes and stats, written last: the shard is complete
    ...
    header.json                written last of all: the store is complete

Block ``b`` of the corpus train blocks lives in shard ``b // shard_blocks``, row ``b % shard_blocks``.
``P = block_len - 1``: the positions 0..T-2 of a block, which predict tokens 1..T-1 (the positions
PD trains on). ``K = top_k`` slots per position: the kept tokens in descending teacher probability
(top-p then top-k, ``losses.truncate_top_p_k``), then padding slots with the sentinel index 0 and
log-prob -inf. The log-probs are the teacher's full-softmax log-probs at tau = 1 (NOT renormalised
over the kept set), so ``exp(logsumexp)`` over a row is the teacher's kept mass; any temperature is
applied later (``losses.token_divergence`` renormalises over the kept set and divides by tau).
Each kept slot costs 2 + 2 bytes with uint16 ids, so a record is ``4 * K`` bytes per token.

The ``.npy`` files are opened with ``numpy`` memory maps: a batch reads only its own rows.
Every file is written to a ``.tmp-`` name, flushed and renamed; ``header.json`` is written last,
so a folder without it is an unfinished build. An unfinished build whose ``plan.json`` matches
the new build continues (complete shards are kept) unless ``on_partial='rebuild'``.

The header records what the logits were computed from; ``LogitStore.check`` refuses a store whose
tokenizer hash, vocab size, block length, block count, corpus fingerprint, top_p or top_k differ
from the run's, with a one-line ``UserError`` naming the store, the field and both values.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from minidistill.errors import UserError
from minidistill.functional.losses import NEG_INF, Truncated, truncate_top_p_k
from minidistill.training.checkpoint import write_json_atomic

FORMAT = "minidistill-logit-store"
VERSION = 1
HEADER = "header.json"
PLAN = "plan.json"
PACKING = (
    "data.pack_blocks: documents tokenized, BOS prefix if the tokenizer adds one, EOS after each, "
    "concatenated and cut into full blocks; train blocks after data.split_blocks and data.max_blocks"
)
# Fields a reader must agree on (in this order in error messages).
CHECKED = ("tokenizer_hash", "vocab_size", "block_len", "n_blocks", "corpus_fingerprint", "top_p", "top_k")


# ---------------------------------------------------------------- what a store is keyed by


def tokenizer_hash(tokenizer) -> str:
    """Short sha256 of the tokenizer's vocabulary (token -> id, added tokens included) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    h = hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def index_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def truncate_raw(teacher_logits: torch.Tensor, top_p: float, top_k: int, *, chunk_rows: int = 32) -> Truncated:
    """Top-p-k truncation with the teacher's full-softmax log-probs at tau = 1 on the kept slots
    (not renormalised; -inf on unused slots, index 0); (B, T, V) -> (B, T, K = top_k)."""
    return truncate_top_p_k(teacher_logits, top_p, top_k, renormalize=False, chunk_rows=chunk_rows)


def identity(
    *,
    tokenizer_hash: str,
    vocab_size: int,
    block_len: int,
    n_blocks: int,
    corpus_fingerprint: str,
    top_p: float,
    top_k: int,
    teacher: str = "",
    packing: str = PACKING,
) -> dict:
    """The header fields that say what a store holds (everything but shards and stats)."""
    if top_k < 1:
        raise UserError(
            f"top_k: an offline logit store needs top_k >= 1 (got {top_k}); full distributions are not stored"
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer_hash": tokenizer_hash,
        "vocab_size": int(vocab_size),
        "block_len": int(block_len),
        "positions_per_block": int(block_len) - 1,
        "n_blocks": int(n_blocks),
        "corpus_fingerprint": corpus_fingerprint,
        "packing": packing,
        "top_p": float(top_p),
        "top_k": int(top_k),
        "temperature": 1.0,
        "index_dtype": index_dtype(vocab_size).name,
        "logprob_dtype": "float16",
        "padding": {"index": 0, "logprob": "-inf"},
        "teacher": teacher,
    }


# ---------------------------------------------------------------- writing


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def _shard_complete(folder: Path, i: int) -> dict | None:
    """The shard's record if its json and both arrays exist with the recorded sizes."""
    rec = _read_json(folder / f"{shard_name(i)}.json")
    if rec is None:
        return None
    for fname, size in rec.get("files", {}).items():
        p = folder / fname
        if not p.is_file() or p.stat().st_size != size:
            return None
    return rec


def _write_shard(
    folder: Path,
    i: int,
    start: int,
    blocks: torch.Tensor,
    logits_fn: Callable,
    ident: dict,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> dict:
    """Teacher pass over ``blocks`` (n, T); writes shard ``i`` atomically; returns its record."""
    n, T = blocks.shape
    K, P = ident["top_k"], ident["positions_per_block"]
    name = shard_name(i)
    files = {"indices": f"{name}.indices.npy", "logprobs": f"{name}.logprobs.npy"}
    tmp = {k: folder / f".tmp-{v}" for k, v in files.items()}
    idx_mm = np.lib.format.open_memmap(tmp["indices"], mode="w+", dtype=np.dtype(ident["index_dtype"]), shape=(n, P, K))
    lp_mm = np.lib.format.open_memmap(tmp["logprobs"], mode="w+", dtype=np.float16, shape=(n, P, K))
    kept_count = kept_mass = 0.0
    for b in range(0, n, batch_size):
        ids = blocks[b : b + batch_size]  # (b, T)
        with torch.no_grad():
            logits = logits_fn(ids)[:, :-1]  # (b, P, V): position t predicts token t+1
        tr = truncate_raw(logits, ident["top_p"], ident["top_k"])  # (b, P, K)
        lp = tr.logprobs.float()
        kept_count += float((lp > NEG_INF).sum())
        kept_mass += float(lp.logsumexp(-1).exp().sum())
        idx_mm[b : b + len(ids)] = tr.indices.cpu().numpy().astype(idx_mm.dtype)
        lp_mm[b : b + len(ids)] = lp.cpu().numpy().astype(np.float16)
        if progress is not None:
            progress(len(ids))
    for mm in (idx_mm, lp_mm):
        mm.flush()
    del idx_mm, lp_mm
    for k, v in files.items():
        os.replace(tmp[k], folder / v)
    rec = {
        "shard": i,
        "blocks": [start, start + n],
        "files": {v: (folder / v).stat().st_size for v in files.values()},
        "kept_sum": kept_count,
        "teacher_kept_mass_sum": kept_mass,
        "positions": n * P,
    }
    write_json_atomic(folder / f"{name}.json", rec)
    return rec


def _clear(folder: Path) -> None:
    for p in folder.iterdir():
        if p.name.startswith(("shard_", ".tmp-shard_", f".tmp-{HEADER}", f".tmp-{PLAN}")) or p.name in (HEADER, PLAN):
            p.unlink()


def build_store(
    folder: str | Path,
    blocks: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    ident: dict,
    *,
    batch_size: int = 8,
    shard_blocks: int = 1024,
    on_partial: str = "continue",
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Write the store for ``blocks`` (N, T) into ``folder``; returns the header.

    ``logits_fn(ids (b, T)) -> teacher logits (b, T, V)`` is called under ``torch.no_grad``.
    ``ident`` comes from ``identity(...)``. A complete store with the same identity is kept as is
    (nothing recomputed); an unfinished one continues (``on_partial='continue'``: complete shards
    kept) or is wiped (``'rebuild'``); anything else in the folder's store files is replaced.
    With several processes, shard i is written by rank ``i % world``; rank 0 writes plan and header.
    """
    folder = Path(folder)
    N, T = blocks.shape
    if T != ident["block_len"] or N != ident["n_blocks"]:
        raise ValueError(
            f"blocks {tuple(blocks.shape)} do not match the identity ({ident['n_blocks']}, {ident['block_len']})"
        )
    n_shards = (N + shard_blocks - 1) // shard_blocks
    plan = dict(ident, shard_blocks=int(shard_blocks), n_shards=n_shards)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        header = _read_json(folder / HEADER)
        if (
            header is not None
            and {k: header.get(k) for k in plan} == plan
            and all(_shard_complete(folder, i) for i in range(n_shards))
        ):
            log(f"logit store {folder}: complete, reusing it")
        else:
            old = _read_json(folder / PLAN)
            if header is not None or old != plan or on_partial == "rebuild":
                if any(p.name.startswith("shard_") for p in folder.iterdir()):
                    log(
                        f"logit store {folder}: rebuilding (existing shards are from another build or rebuild was asked)"
                    )
                _clear(folder)
            else:
                done = sum(_shard_complete(folder, i) is not None for i in range(n_shards))
                if done:
                    log(f"logit store {folder}: continuing an unfinished build ({done}/{n_shards} shards complete)")
            write_json_atomic(folder / PLAN, plan)
    barrier()
    header = _read_json(folder / HEADER)
    if header is None:
        for i in range(rank, n_shards, world):
            if _shard_complete(folder, i) is not None:
                if progress is not None:
                    progress(min(N, (i + 1) * shard_blocks) - i * shard_blocks)
                continue
            start = i * shard_blocks
            _write_shard(folder, i, start, blocks[start : start + shard_blocks], logits_fn, ident, batch_size, progress)
        barrier()
        if rank == 0:
            shards = [_shard_complete(folder, i) for i in range(n_shards)]
            missing = [i for i, s in enumerate(shards) if s is None]
            if missing:
                raise RuntimeError(f"logit store {folder}: shards {missing} missing after the build")
            positions = sum(s["positions"] for s in shards)
            nbytes = sum(sum(s["files"].values()) for s in shards)
            header = dict(
                plan,
                created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                shards=[{"blocks": s["blocks"], "files": s["files"]} for s in shards],
                stats={
                    "positions": positions,
                    "bytes": nbytes,
                    "bytes_per_token": nbytes / positions,
                    "bytes_per_slot": nbytes / (positions * ident["top_k"]),
                    "mean_kept": sum(s["kept_sum"] for s in shards) / positions,
                    "mean_teacher_kept_mass": sum(s["teacher_kept_mass_sum"] for s in shards) / positions,
                },
            )
            write_json_atomic(folder / HEADER, header)
        barrier()
        header = _read_json(folder / HEADER)
    return header


# ---------------------------------------------------------------- reading


class LogitStore:
    """A complete store opened for reading: ``get(block_ids)`` -> (indices, logprobs) arrays."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"{self.folder}: logit store folder not found (build it with a pd_store stage)")
        path = self.folder / HEADER
        if not path.is_file():
            raise UserError(f"{self.folder}: logit store is incomplete (no {HEADER}; run or resume its pd_store stage)")
        header = _read_json(path)
        if not isinstance(header, dict):
            raise UserError(f"{path}: logit store header is unreadable (not a JSON object); rebuild the store")
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise UserError(
                f"{self.folder}: not a minidistill logit store of version {VERSION} "
                f"(format {header.get('format')!r}, version {header.get('version')!r})"
            )
        missing = [k for k in (*CHECKED, "shard_blocks", "shards") if k not in header]
        if (
            missing
            or not isinstance(header["shards"], list)
            or not all(isinstance(s, dict) and isinstance(s.get("files"), dict) for s in header["shards"])
        ):
            raise UserError(
                f"{path}: logit store header is damaged (missing or malformed {missing or ['shards']}); "
                "rebuild the store"
            )
        for s in header["shards"]:
            for fname, size in s["files"].items():
                p = self.folder / fname
                if not p.is_file() or p.stat().st_size != size:
                    raise UserError(
                        f"{p}: logit store shard file missing or truncated (expected {size} bytes); rebuild the store"
                    )
        self.header = header
        self.shard_blocks = header["shard_blocks"]
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def check(self, expected: dict) -> None:
        """Refuse a store built for other data: one-line UserError naming the field and both values."""
        for key in CHECKED:
            if key in expected and self.header.get(key) != expected[key]:
                raise UserError(
                    f"{self.folder}: logit store {key} is {self.header.get(key)!r} but this run has "
                    f"{expected[key]!r}; rebuild the store for this tokenizer/corpus/settings"
                )

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._maps:
            name = shard_name(i)
            self._maps[i] = (
                np.load(self.folder / f"{name}.indices.npy", mmap_mode="r"),
                np.load(self.folder / f"{name}.logprobs.npy", mmap_mode="r"),
            )
        return self._maps[i]

    def get(self, block_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(indices (B, P, K) stored dtype, logprobs (B, P, K) float16) for these train blocks."""
        rows_i, rows_l = [], []
        for b in block_ids:
            if not 0 <= b < self.header["n_blocks"]:
                raise IndexError(f"block {b} outside the store's {self.header['n_blocks']} blocks")
            idx, lp = self._shard(b // self.shard_blocks)
            rows_i.append(idx[b % self.shard_blocks])
            rows_l.append(lp[b % self.shard_blocks])
        return np.stack(rows_i), np.stack(rows_l)

    def truncated(self, block_ids: Sequence[int], device: torch.device | str = "cpu") -> Truncated:
        """The stored teacher distributions as ``losses.Truncated`` (int64 ids, float16 log-probs)."""
        idx, lp = self.get(block_ids)
        return Truncated(torch.from_numpy(idx.astype(np.int64)).to(device), torch.from_numpy(lp).to(device))

    @property
    def bytes_per_token(self) -> float:
        return self.header["stats"]["bytes_per_token"]


def remove_store(folder: str | Path) -> None:
    """Delete a store folder (tests, benchmarks)."""
    shutil.rmtree(folder, ignore_errors=True)
