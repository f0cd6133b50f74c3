"""Tokenizer helpers shared by instruction data and corpora: special-token affixes, prompt
encoding, EOS lookup, quiet batch tokenization."""

from __future__ import annotations

from typing import Any

from minidistill.errors import UserError


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Ids the tokenizer adds before/after a text with add_special_tokens=True (e.g. ([bos], []))."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    n = len(bare)
    for i in range(len(with_special) - n + 1):
        if with_special[i : i + n] == bare:
            return with_special[:i], with_special[i + n :]
    return [], []


def encode_prompt(text: str, tokenizer: Any, prefix: list[int] | None = None) -> list[int]:
    """Token ids of a prompt: the tokenizer's leading special tokens (BOS) at most once, never a trailing EOS."""
    if prefix is None:
        prefix = special_affixes(tokenizer)[0]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return with_prefix(ids, prefix)


def with_prefix(ids: list[int], prefix: list[int]) -> list[int]:
    if prefix and ids[: len(prefix)] != prefix:
        return prefix + ids
    return ids


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
        raise UserError(f"{name}: tokenizer has no eos_token; set one in its tokenizer_config.json")
    return int(eos)


def tokenize_quiet(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Batch-tokenize without the 'sequence longer than model_max_length' warning (we cut blocks ourselves)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(level)
