"""Forward passes that compute only the logits a distillation loss reads.

A distillation loss on a response needs the next-token logits at the T positions that predict
the response tokens, not at the P prompt positions; on a 49k-word vocabulary the LM head is a
third or more of a small model's FLOPs, so :func:`response_logits` asks the model for the last
T+1 positions only (``logits_to_keep``, which every HF causal LM in transformers v5 accepts).

Rows of a batch differ in prompt length; a forward over the whole batch pays for the longest
prompt in every row. :func:`length_chunks` groups rows of similar prompt length and trims each
group's all-padding columns, so forwards run chunk by chunk over (nearly) real tokens only.

A frozen teacher's numbers are reused instead of recomputed: :func:`split_head` splits a model
into its backbone (up to the final norm) and its LM head when ``logits == head(hidden)`` holds.
The sampler keeps the teacher's final hidden states of each response (B, T, H) -- a few MB,
where the logits would be B*T*V -- and the loss rebuilds the teacher logits with one matmul
(:func:`head_logits`) instead of a teacher forward per minibatch and PPO epoch. Models whose
logits are not a plain head(hidden) (soft-capping, logit scales, wrapped/sharded teachers) fall
back to full forwards.
"""

from __future__ import annotations

import inspect

import torch

__all__ = [
    "unwrap",
    "hf_model",
    "model_device",
    "split_head",
    "head_logits",
    "next_token_logits",
    "response_logits",
    "response_hidden",
    "length_chunks",
    "logits_at",
]

# config attributes of models whose logits are not head(hidden) (Gemma soft-capping, Cohere
# logit_scale, Granite logits_scaling, ...): no split for those
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/accelerate wrappers (``.module``), else the model itself (peft kept)."""
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/accelerate (``.module``) and peft wrappers."""
    model = unwrap(model)
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(hf_model(model).forward).parameters


def split_head(model: torch.nn.Module):
    """``(backbone, head)`` with ``model(x).logits == head(backbone(x).last_hidden_state)``, else None.

    Only for plain (unwrapped) transformers models: a DDP/FSDP/DeepSpeed-wrapped teacher must run
    through its wrapper's forward, so it gets None.
    """
    if not hasattr(model, "config") or hasattr(model, "get_base_model") or type(model).__name__.startswith("FSDP"):
        return None  # plain models only: peft, DDP/FSDP-wrapped or sharded ones run their own forward
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or not isinstance(head, torch.nn.Linear):
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    return backbone, head


def head_logits(model: torch.nn.Module, hidden: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
    """Logits from final hidden states: ``head(hidden)[..., :vocab]``. # (..., V)"""
    _, head = split_head(model)
    out = head(hidden.to(head.weight.dtype))
    return out if vocab is None else out[..., :vocab]


def _inputs(prompt_ids, prompt_mask, response_ids, response_mask):
    ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+T)
    mask = torch.cat([prompt_mask, response_mask], dim=1)  # (B, P+T)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P+T)
    return ids, mask, pos


def next_token_logits(model, input_ids, attention_mask=None, vocab: int | None = None) -> torch.Tensor:
    """Logits of every position but the last, (B, L-1, V): position t predicts token t+1 of
    ``input_ids`` (B, L) (right-padded rows or packed text blocks); the first ``vocab`` logits
    (None: the whole head). No KV cache is built."""
    z = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    return z[..., :vocab] if vocab is not None and z.shape[-1] > vocab else z


def response_logits(
    model,
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    vocab: int | None = None,
    *,
    hidden: torch.Tensor | None = None,
):
    """Logits predicting each response token: (B, T, V), on the model's device; position P-1+t predicts y_t.

    Prompts LEFT-padded (B, P), responses RIGHT-padded (B, T), moved to the model's device. Only
    the last T+1 positions go through the LM head when the model takes ``logits_to_keep``. No KV
    cache is built (a model in eval mode would make one by default, and activation checkpointing
    would replay into it). ``hidden``: the model's final hidden states predicting each response
    token (B, T, H), e.g. the teacher's as the sampler kept them; when given and the model splits
    (:func:`split_head`) the logits are ``head(hidden)`` (one matmul, no forward).
    """
    if hidden is not None and split_head(model) is not None:
        return head_logits(model, hidden, vocab)
    dev = model_device(model)
    prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
    response_ids, response_mask = response_ids.to(dev), response_mask.to(dev)
    ids, mask, pos = _inputs(prompt_ids, prompt_mask, response_ids, response_mask)
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    if accepts_logits_to_keep(model):
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=T + 1, use_cache=False
        ).logits[:, :T]
    else:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[
            :, P - 1 : P - 1 + T
        ]
    return logits if vocab is None else logits[..., :vocab]


def response_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
    """Final hidden states predicting each response token (needs :func:`split_head`). # (B, T, H)"""
    backbone, _ = split_head(model)
    ids, mask, pos = _inputs(prompt_ids, prompt_mask, response_ids, response_mask)
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    h = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    return h[:, P - 1 : P - 1 + T]


def length_chunks(prompt_mask: torch.Tensor, response_mask: torch.Tensor, rows_per_chunk: int):
    """Split a batch into groups of at most ``rows_per_chunk`` rows of similar prompt length.

    Yields ``(rows, p0, t1)``: row indices (sorted by prompt length), the first prompt column that
    is not padding in every one of those rows (prompts are LEFT-padded) and the response width
    they need (responses are RIGHT-padded). Slicing ``[:, p0:]`` and ``[:, :t1]`` drops only
    padding, which changes nothing a causal model computes for the real tokens.
    """
    plen = prompt_mask.sum(-1)  # (B,)
    tlen = response_mask.sum(-1)  # (B,)
    order = torch.argsort(plen, stable=True)
    P = prompt_mask.shape[1]
    for i in range(0, order.numel(), max(1, rows_per_chunk)):
        rows = order[i : i + rows_per_chunk]
        yield rows, P - int(plen[rows].max()), max(1, int(tlen[rows].max()))


def logits_at(model, input_ids, attention_mask, rows: torch.Tensor, vocab: int | None = None):
    """``f(start, stop) -> (n, V)``: the no-grad next-token logits at the flat positions
    ``rows[start:stop]`` of the (B, L-1) positions of ``input_ids`` (B, L) (right-padded; the first
    ``vocab`` logits). With a :func:`split_head` model one backbone forward keeps the final hidden
    states of those positions only and the head runs a chunk at a time, so a 262k-token
    vocabulary never has (B, L, V) logits in memory; otherwise one full forward."""
    with torch.no_grad():
        split = split_head(model)
        if split is not None:
            backbone, head = split
            h = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            h = h[:, :-1].reshape(-1, h.shape[-1])[rows]  # (M, H)

            def chunk(a: int, b: int) -> torch.Tensor:
                with torch.no_grad():
                    out = head(h[a:b].to(head.weight.dtype))
                return out if vocab is None else out[..., :vocab]

            return chunk
        z = next_token_logits(model, input_ids, attention_mask, vocab)
        z = z.reshape(-1, z.shape[-1])[rows]
        return lambda a, b: z[a:b]
