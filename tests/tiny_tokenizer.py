"""Offline test helpers: a byte-level tokenizer (one token per UTF-8 byte) and a tiny Llama.

Ids: 0 = "<|endoftext|>" (EOS), 1 = "<pad>", 2 = "<s>" (BOS, added only when ``add_bos``),
then the 256 byte symbols. Text of n ASCII characters is exactly n tokens, which keeps length
arithmetic in tests obvious.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

EOS, PAD, BOS = "<|endoftext|>", "<pad>", "<s>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(*, add_bos: bool = False, chat_template: bool = True, pad: bool = True) -> PreTrainedTokenizerFast:
    """A lossless byte-level BPE tokenizer with no merges, built in-process."""
    specials = [EOS, PAD, BOS]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        bos_token=BOS,
        pad_token=PAD if pad else None,
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(tokenizer, *, seed: int = 0, max_positions: int = 1024):
    """A 2-layer, 32-wide random Llama matching ``tokenizer``'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


# ---- tokenizers of another kind, for cross-tokenizer tests ----------------------------------------

WORD_PIECES = ("th", "he", "Ġt", "Ġthe", "er", "on", "an", "Ġa", "ll", "el", "Ġc", "or", "Ġs", "at", "in", "Ġo", "ou")


def make_bpe_tokenizer(*, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a few word-piece merges (``WORD_PIECES``) and its specials in
    another order than :func:`make_tokenizer`'s: 0 = "<pad>", 1 = "</s>" (EOS), 2 = "<bos>"."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<pad>", "</s>", "<bos>"]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    merges = []
    for piece in WORD_PIECES:  # each merge joins two symbols already in the vocabulary
        for cut in range(len(piece) - 1, 0, -1):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                merges.append((a, b))
                vocab[piece] = len(vocab)
                break
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<bos>", pad_token="<pad>")
    if chat_template:
        tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" + (
            "{% if add_generation_prompt %}[assistant] {% endif %}"
        )
    return tok


def make_sp_tokenizer(*, byte_fallback: bool = True) -> PreTrainedTokenizerFast:
    """A SentencePiece-style (Gemma-like) tokenizer: spaces become "▁", printable ASCII and a few
    "▁word" pieces are tokens, everything else falls back to <0xNN> byte tokens (``byte_fallback``;
    without it: <unk>). 0 = "<pad>", 1 = "<eos>", 2 = "<bos>", 3 = "<unk>"."""
    from tokenizers import normalizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = ["▁"] + [chr(c) for c in range(33, 127)] + ["\n", "\t"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)] if byte_fallback else []
    vocab = {tok: i for i, tok in enumerate(specials + byte_tokens + chars)}
    merges = []
    for piece in ("▁t", "he", "▁the", "▁a", "in", "▁c", "on", "er", "▁o", "ol", "▁s"):
        for cut in range(len(piece) - 1, 0, -1):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                merges.append((a, b))
                vocab[piece] = len(vocab)
                break
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=byte_fallback))
    backend.normalizer = normalizers.Replace(" ", "▁")
    parts = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if byte_fallback else []) + [decoders.Fuse()]
    backend.decoder = decoders.Sequence(parts)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>", unk_token="<unk>"
    )
