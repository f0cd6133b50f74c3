"""Plain-text corpora: files, globs and folders -> documents -> EOS-separated token blocks for
PD and MiniLLM's L_PT; the held-out split and the fingerprint that offline logit stores check.
See ``minidistill.data``."""

from __future__ import annotations

import glob as _glob
import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minidistill.data.files import json_type, read_json_list, read_jsonl
from minidistill.data.tokens import eos_id, special_affixes, tokenize_quiet, with_prefix
from minidistill.errors import UserError

_DIR_SUFFIXES = (".txt", ".jsonl")  # files picked up when a corpus path is a directory


class TextList(list):
    """A list of documents that remembers which files they came from (``.sources``) and, for
    generated text, which documents are complete (``.complete``; None: all of them). An
    incomplete one (a teacher answer cut at its token limit) gets no EOS when packed."""

    sources: list[str]
    complete: list[bool] | None

    def __init__(self, docs: Iterable[str] = (), sources: Sequence[str] = (), complete: Sequence[bool] | None = None):
        super().__init__(docs)
        self.sources = list(sources)
        self.complete = [bool(c) for c in complete] if complete is not None else None
        if self.complete is not None and len(self.complete) != len(self):
            raise ValueError(f"TextList: {len(self)} documents but {len(self.complete)} complete flags")


def _expand(paths: str | Path | Sequence[str | Path]) -> list[tuple[Path, str]]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise UserError("corpus: no paths given")
    files: list[tuple[Path, str]] = []
    for item in items:
        shown = str(item)
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _DIR_SUFFIXES)
            if not found:
                raise UserError(f"{shown}: directory has no {', '.join(_DIR_SUFFIXES)} files")
            files.extend((f, str(f)) for f in found)
        elif p.is_file():
            files.append((p, shown))
        elif any(c in shown for c in "*?["):
            found = sorted(Path(f) for f in _glob.glob(shown, recursive=True) if Path(f).is_file())
            if not found:
                raise UserError(f"{shown}: no files match this pattern")
            files.extend((f, str(f)) for f in found)
        else:
            raise UserError(f"{shown}: file not found")
    return files


def split_documents(text: str) -> list[str]:
    """Documents in a plain text: blank-line-separated chunks, or one per line if there is no blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    if re.search(r"\n[ \t]*\n", text):
        chunks = re.split(r"\n(?:[ \t]*\n)+", text)
    else:
        chunks = text.split("\n")
    return [c.rstrip() for c in chunks if c.strip()]


def _texts_from_json(records: list[tuple[str, Any]]) -> list[str]:
    docs = []
    for where, rec in records:
        if isinstance(rec, str):
            text = rec
        elif isinstance(rec, dict):
            if "text" not in rec:
                raise UserError(f"{where}: record has no 'text' field")
            text = rec["text"]
            if not isinstance(text, str):
                raise UserError(f"{where}: field 'text' must be a string, got {json_type(text)}")
        else:
            raise UserError(f"{where}: expected an object with a 'text' field, got {json_type(rec)}")
        if text.strip():
            docs.append(text)
    return docs


def load_texts(paths: str | Path | Sequence[str | Path]) -> TextList:
    """Read documents from files, directories (recursive) or glob patterns (see the module docstring)."""
    files = _expand(paths)
    docs: list[str] = []
    for path, shown in files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            docs.extend(_texts_from_json(read_jsonl(path, shown)))
        elif suffix == ".json":
            docs.extend(_texts_from_json(read_json_list(path, shown)))
        else:
            try:
                docs.extend(split_documents(path.read_bytes().decode("utf-8")))
            except UnicodeDecodeError as e:
                raise UserError(f"{shown}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    sources = [s for _, s in files]
    if not docs:
        raise UserError(f"{', '.join(sources)}: no text found")
    return TextList(docs, sources)


def pack_blocks(
    texts: Sequence[str], tokenizer: Any, block_len: int, *, sources: Sequence[str] | None = None
) -> torch.Tensor:
    """Tokenize documents, follow each with EOS (except those ``texts.complete`` marks as cut:
    their text did not end there), concatenate and cut into full (N, block_len) blocks."""
    if sources is None:
        sources = getattr(texts, "sources", None) or ["<texts>"]
    complete = getattr(texts, "complete", None)
    if block_len < 2:
        raise UserError(f"block_len: must be at least 2, got {block_len}")
    eos = eos_id(tokenizer)
    prefix = special_affixes(tokenizer)[0]
    pieces: list[np.ndarray] = []
    batch = 256
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        for k, ids in enumerate(tokenize_quiet(tokenizer, chunk)):
            ids = with_prefix(list(ids), prefix)
            ended = complete is None or complete[start + k]
            if ended and (not ids or ids[-1] != eos):
                ids.append(eos)
            pieces.append(np.asarray(ids, dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n = len(stream) // block_len
    if n == 0:
        raise UserError(
            f"{', '.join(sources)}: corpus has {len(stream)} tokens, fewer than one block of block_len={block_len}"
        )
    return torch.from_numpy(stream[: n * block_len].reshape(n, block_len).copy())


def corpus_fingerprint(blocks: torch.Tensor) -> str:
    """Short sha256 of the blocks' shape and little-endian int32 token bytes (16 hex chars)."""
    arr = blocks.detach().cpu().to(torch.int32).contiguous().numpy().astype("<i4", copy=False)
    h = hashlib.sha256(f"{tuple(arr.shape)}:".encode())
    h.update(arr.tobytes())
    return h.hexdigest()[:16]


def split_blocks(
    blocks: torch.Tensor, *, valid_fraction: float | None = None, n_valid: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic held-out split: (train, valid), each keeping the original block order."""
    if (valid_fraction is None) == (n_valid is None):
        raise ValueError("split_blocks: give exactly one of valid_fraction or n_valid")
    n = blocks.shape[0]
    if valid_fraction is not None:
        if not 0.0 < valid_fraction < 1.0:
            raise UserError(f"valid_fraction: must be between 0 and 1 (exclusive), got {valid_fraction}")
        n_valid = max(1, round(n * valid_fraction))
    assert n_valid is not None
    if not 1 <= n_valid < n:
        raise UserError(f"n_valid: cannot hold out {n_valid} of {n} blocks (need 1 <= n_valid < {n})")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    valid_idx = perm[:n_valid].sort().values
    train_idx = perm[n_valid:].sort().values
    return blocks[train_idx], blocks[valid_idx]
