"""Instruction data: records (Dolly/MiniLLM, chat, Self-Instruct seed tasks) -> examples ->
prompt templates -> token rows with loss masks -> padded batches. See ``minidistill.data``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minidistill.data.files import json_type, read_json_list, read_jsonl
from minidistill.data.tokens import eos_id, special_affixes, with_prefix
from minidistill.errors import UserError

IGNORE_INDEX = -100


TEMPLATES = ("alpaca", "chat")


LONG_PROMPT_POLICIES = ("drop", "truncate")


ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Example:
    """One instruction example. ``outputs[0]`` is the training target; all are references."""

    instruction: str
    input: str = ""
    outputs: list[str] = field(default_factory=list)
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    source: str = ""  # "file:line" (or "name[split]#index" for hub data), for error messages
    # False for a response that was cut off (a teacher answer that hit max_new_tokens): training
    # on it appends no EOS, so the student is not taught to stop where the teacher was cut
    complete: bool = True

    @property
    def response(self) -> str:
        """The training target (first reference), '' when there is none."""
        return self.outputs[0] if self.outputs else ""


def load_instructions(source: str | Path, *, split: str = "train", require_output: bool = True) -> list[Example]:
    """Load instruction examples from a .jsonl/.json file or a ``datasets`` hub name (owner/name).

    ``require_output=False`` accepts prompt-only records (``outputs`` empty), for pipelines where
    the teacher writes the responses (the ``generate`` stage)."""
    path = Path(source)
    shown = str(source)
    if path.is_dir():
        raise UserError(f"{shown}: is a directory; expected a .jsonl or .json file of instruction records")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = read_jsonl(path, shown)
        elif suffix == ".json":
            records = read_json_list(path, shown)
        else:
            raise UserError(f"{shown}: unsupported file type '{path.suffix}'; expected .jsonl or .json")
    elif path.suffix.lower() in (".json", ".jsonl") or not _HUB_NAME.match(shown):
        raise UserError(f"{shown}: file not found")
    else:
        records = _read_hub(shown, split)
    examples: list[Example] = []
    for where, rec in records:
        examples.extend(parse_record(rec, where, require_output=require_output))
    if not examples:
        raise UserError(f"{shown}: no instruction records found")
    return examples


def _read_hub(name: str, split: str) -> list[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise UserError(f"{name}: not a local file, and 'datasets' is not installed to load it from the hub") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure is a user-facing problem
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{name}: not a local file and could not be loaded with datasets.load_dataset (split '{split}'): {msg}"
        ) from None
    return [(f"{name}[{split}]#{i}", rec) for i, rec in enumerate(ds)]


def _str_field(rec: dict, key: str, where: str) -> str:
    value = rec.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {json_type(value)}")
    return value


def _outputs(value: Any, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{where}: field '{key}' must be a string or a non-empty list of strings, got {json_type(value)}")


def parse_record(rec: Any, where: str, require_output: bool = True) -> list[Example]:
    """Turn one raw record into examples (one, or one per instance for Self-Instruct seed tasks)."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object (a record), got {json_type(rec)}")
    prompt = rec.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise UserError(f"{where}: field 'prompt' must be a string, got {json_type(prompt)}")

    if "messages" in rec:
        return [_parse_chat(rec["messages"], prompt, where)]

    has_instruction = "instruction" in rec
    instruction = _str_field(rec, "instruction", where)
    inp = _str_field(rec, "input", where) if "input" in rec else _str_field(rec, "context", where)
    for key in ("output", "response"):
        if key in rec:
            outputs = _outputs(rec[key], key, where)
            break
    else:
        if isinstance(rec.get("instances"), list) and has_instruction:
            return _parse_instances(rec["instances"], instruction, where)
        if not require_output and (has_instruction or prompt is not None):
            return [Example(instruction=instruction, input=inp, outputs=[], prompt=prompt, source=where)]
        raise UserError(
            f"{where}: record has no 'output' or 'response' field (or 'messages' with a final assistant turn)"
        )
    if not has_instruction and prompt is None:
        raise UserError(f"{where}: record has no 'instruction' field (or a pre-rendered 'prompt', or 'messages')")
    return [Example(instruction=instruction, input=inp, outputs=outputs, prompt=prompt, source=where)]


def _parse_instances(instances: list, instruction: str, where: str) -> list[Example]:
    out = []
    for j, inst in enumerate(instances):
        w = f"{where} instances[{j}]"
        if not isinstance(inst, dict) or "output" not in inst:
            raise UserError(f"{w}: expected an object with 'input' and 'output' fields")
        out.append(
            Example(
                instruction=instruction,
                input=_str_field(inst, "input", w),
                outputs=_outputs(inst["output"], "output", w),
                source=where,
            )
        )
    return out


def _parse_chat(messages: Any, prompt: str | None, where: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: messages[{k}] must be an object with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: 'messages' must end with an assistant turn (the response); last role is '{messages[-1]['role']}'"
        )
    context = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    users = [m["content"] for m in context if m["role"] == "user"]
    return Example(
        instruction=users[-1] if users else "",
        input="",
        outputs=[messages[-1]["content"]],
        prompt=prompt,
        messages=context,
        source=where,
    )


def render_alpaca(instruction: str, input: str = "") -> str:
    """The MiniLLM / Alpaca prompt, ending with '### Response:\\n'."""
    if input:
        return f"{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def render_prompt(example: Example, template: str, tokenizer: Any = None) -> str:
    """Render the prompt text for ``template`` ('alpaca' or 'chat')."""
    if template == "alpaca":
        if example.prompt is not None:
            return example.prompt
        return render_alpaca(example.instruction, example.input)
    if template == "chat":
        if tokenizer is None:
            raise ValueError("render_prompt(template='chat') needs a tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise UserError(f"{name}: tokenizer has no chat_template; use template 'alpaca'")
        messages = example.messages
        if messages is None:
            content = example.instruction + (f"\n\n{example.input}" if example.input else "")
            if not content and example.prompt:  # a record that only has a pre-rendered prompt
                content = example.prompt
            messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raise UserError(f"template: unknown template '{template}' (expected one of: {', '.join(TEMPLATES)})")


@dataclass
class TokenizeStats:
    """What tokenize_sft / tokenize_prompts kept, dropped and truncated."""

    n_examples: int = 0
    n_kept: int = 0
    n_dropped_long_prompt: int = 0
    n_truncated_prompt: int = 0
    n_truncated_response: int = 0
    kept_indices: list[int] = field(default_factory=list)

    def summary(self) -> str:
        """One human-readable line."""
        return (
            f"{self.n_kept}/{self.n_examples} examples kept; {self.n_dropped_long_prompt} dropped (long prompt), "
            f"{self.n_truncated_prompt} prompts and {self.n_truncated_response} responses truncated"
        )


def _check_lengths(max_prompt_length: int, max_length: int | None, long_prompt: str, prefix: list[int]) -> None:
    if long_prompt not in LONG_PROMPT_POLICIES:
        raise UserError(f"long_prompt: unknown policy '{long_prompt}' (expected 'drop' or 'truncate')")
    if max_prompt_length <= len(prefix):
        raise UserError(f"max_prompt_length: must be greater than {len(prefix)}, got {max_prompt_length}")
    if max_length is not None and max_length <= max_prompt_length:
        raise UserError(f"max_length: must be greater than max_prompt_length ({max_prompt_length}), got {max_length}")


def _sources(examples: Sequence[Example]) -> str:
    files: list[str] = []
    for ex in examples:
        src = re.sub(r"(:\d+|\[\d+\]|\[[^\]]*\]#\d+)( instances\[\d+\])?$", "", ex.source) or "<examples>"
        if src not in files:
            files.append(src)
    return ", ".join(files) if files else "<examples>"


def _fit_prompt(
    ids: list[int], prefix: list[int], max_prompt_length: int, long_prompt: str, stats: TokenizeStats
) -> list[int] | None:
    if len(ids) <= max_prompt_length:
        return ids
    if long_prompt == "drop":
        stats.n_dropped_long_prompt += 1
        return None
    stats.n_truncated_prompt += 1
    keep = max_prompt_length - len(prefix)
    body = ids[len(prefix) :] if prefix and ids[: len(prefix)] == prefix else ids
    return prefix + body[-keep:]


def _nothing_left(examples: Sequence[Example], stats: TokenizeStats, max_prompt_length: int) -> UserError:
    return UserError(
        f"{_sources(examples)}: all {stats.n_dropped_long_prompt} examples dropped: prompts longer than "
        f"max_prompt_length={max_prompt_length} tokens (raise it or use long_prompt='truncate')"
    )


def tokenize_sft(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    template: str = "alpaca",
    max_prompt_length: int = 256,
    max_length: int = 512,
    long_prompt: str = "drop",
) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Tokenize for SFT: rows {input_ids, labels, prompt_length}; labels are -100 on the prompt,
    the response ids + EOS after it (the response is cut, EOS included, to fit max_length). An
    example whose response is not ``complete`` (cut off when it was generated) gets no EOS."""
    if not examples:
        raise UserError("<examples>: no instruction examples to tokenize")
    prefix = special_affixes(tokenizer)[0]
    _check_lengths(max_prompt_length, max_length, long_prompt, prefix)
    eos = eos_id(tokenizer)
    prompts = [render_prompt(ex, template, tokenizer) for ex in examples]
    responses = [ex.response for ex in examples]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=False)["input_ids"]
    stats = TokenizeStats(n_examples=len(examples))
    rows: list[dict[str, Any]] = []
    for i, (p, full, response) in enumerate(zip(p_ids, full_ids, responses)):
        p, full = list(p), list(full)
        # Tokenize prompt+response jointly (as MiniLLM does) unless that changes the prompt's tokens.
        if full[: len(p)] == p:
            r = full[len(p) :]
        else:
            r = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if examples[i].complete and (not r or r[-1] != eos):
            r = r + [eos]
        if not r:  # an empty cut-off response teaches nothing
            continue
        prompt = _fit_prompt(with_prefix(p, prefix), prefix, max_prompt_length, long_prompt, stats)
        if prompt is None:
            continue
        room = max_length - len(prompt)
        if len(r) > room:
            r = r[:room]
            stats.n_truncated_response += 1
        rows.append({"input_ids": prompt + r, "labels": [IGNORE_INDEX] * len(prompt) + r, "prompt_length": len(prompt)})
        stats.kept_indices.append(i)
    stats.n_kept = len(rows)
    if not rows:
        raise _nothing_left(examples, stats, max_prompt_length)
    return rows, stats


def tokenize_prompts(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    template: str = "alpaca",
    max_prompt_length: int = 256,
    long_prompt: str = "drop",
) -> tuple[list[list[int]], list[list[str]], TokenizeStats]:
    """Prompt ids for generation, their references, and stats (``stats.kept_indices`` maps back to examples)."""
    if not examples:
        raise UserError("<examples>: no instruction examples to tokenize")
    prefix = special_affixes(tokenizer)[0]
    _check_lengths(max_prompt_length, None, long_prompt, prefix)
    prompts = [render_prompt(ex, template, tokenizer) for ex in examples]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    stats = TokenizeStats(n_examples=len(examples))
    ids_out: list[list[int]] = []
    refs: list[list[str]] = []
    for i, p in enumerate(p_ids):
        prompt = _fit_prompt(with_prefix(list(p), prefix), prefix, max_prompt_length, long_prompt, stats)
        if prompt is None:
            continue
        ids_out.append(prompt)
        refs.append(list(examples[i].outputs))
        stats.kept_indices.append(i)
    stats.n_kept = len(ids_out)
    if not ids_out:
        raise _nothing_left(examples, stats, max_prompt_length)
    return ids_out, refs, stats


def collate_sft(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into input_ids / attention_mask / labels (labels padded with -100)."""
    if not rows:
        raise ValueError("collate_sft: no rows")
    width = max(len(r["input_ids"]) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        input_ids[i, :k] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        attention_mask[i, :k] = 1
        labels[i, :k] = torch.as_tensor(r["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(id_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompt ids for generation; returns (input_ids, attention_mask)."""
    if not id_lists:
        raise ValueError("collate_prompts: no prompts")
    width = max(len(ids) for ids in id_lists)
    n = len(id_lists)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, ids in enumerate(id_lists):
        k = len(ids)
        if k:
            input_ids[i, width - k :] = torch.as_tensor(list(ids), dtype=torch.long)
            attention_mask[i, width - k :] = 1
    return input_ids, attention_mask
