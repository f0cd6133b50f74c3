"""Recipes: typed, strict, documented configuration.

A recipe is a YAML file with shared settings (output_dir, seed, precision, teacher, student,
data) and an ordered list of ``stages``; each stage has a ``type`` (sft, kd, seqkd, pd,
pd_store, minillm, generate, evaluate) whose settings are the dataclass ``Config`` of its
``STAGE`` in ``minidistill/stages/<type>.py`` (the stages import this module; ``parse_recipe``
reaches them through the registry in ``minidistill/stages/__init__.py``, imported when called).

Every field carries its default and a one-line help text in ``metadata``; ``min``/``max``/
``choices`` in the metadata are checked. Unknown keys are errors that name the key and suggest
the closest valid one; every error is one line (``UserError``) naming the file and key.

Overrides on the command line use dotted keys: ``seed=1``, ``teacher.model=/path``,
``stages.sft.lr=1e-4`` (a stage by name) or ``stages.0.lr=1e-4`` (by index). Values are parsed
as YAML scalars/flow collections (``keep_layers=[0,3,6]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from minidistill.errors import UserError


def opt(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with a default, a help text and optional min/max/choices checks."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


# ----------------------------------------------------------------------------------------------
# Shared settings
# ----------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    enabled: bool = opt(False, "Train a LoRA adapter (peft) instead of all student weights.")
    r: int = opt(16, "LoRA rank.", min=1)
    alpha: int = opt(32, "LoRA scaling alpha.", min=1)
    dropout: float = opt(0.05, "LoRA dropout.", min=0.0, max=1.0)
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get adapters.",
    )


@dataclass
class TeacherConfig:
    model: str = opt("", "Hub id, local folder, a .gguf file, or 'pkg:<python package>' holding a GGUF.")
    gguf_file: str | None = opt(None, "GGUF file name inside `model` (folder or pkg:).")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "Teacher weight dtype; 'auto' follows the recipe precision (frozen weights can be bf16)."
    )
    trust_remote_code: bool = opt(False, "Allow model code from the model folder (off: never run remote code).")
    server: str | None = opt(
        None,
        "URL of an OpenAI-compatible completions server (vLLM) serving the teacher, e.g. http://127.0.0.1:8000; "
        "then `model` names only its tokenizer (README, 'Served teacher').",
    )
    served_model: str | None = opt(None, "The model name on the server (--served-model-name); default: `model`.")
    logprobs: int = opt(
        20, "Served teacher: top-k log-probs per position (the server needs --max-logprobs >= it).", min=1
    )
    request_rows: int = opt(8, "Served teacher: sequences per request.", min=1)
    concurrency: int = opt(4, "Served teacher: requests in flight at once.", min=1)
    timeout_s: float = opt(300.0, "Served teacher: seconds to wait for one answer before retrying.", gt=0.0)
    retries: int = opt(3, "Served teacher: retries of a failed request (timeouts, connection errors, 5xx).", min=0)


@dataclass
class StudentConfig:
    init: Literal["pretrained", "prune", "config"] = opt(
        "pretrained",
        "pretrained: load `model`; prune: copy the teacher keeping `keep_layers` or every "
        "`layer_stride`-th layer; config: fresh random weights from the teacher's config with `config_overrides`.",
    )
    model: str | None = opt(None, "Hub id, local folder, .gguf or pkg: (init: pretrained).")
    gguf_file: str | None = opt(None, "GGUF file name inside `model`.")
    keep_layers: list[int] | None = opt(None, "init prune: teacher layer indices to keep.")
    layer_stride: int | None = opt(None, "init prune: keep layers 0, s, 2s, ... (DistilBERT-style).", min=1)
    config_overrides: dict[str, Any] = opt({}, "init config: teacher config fields to change (e.g. num_hidden_layers).")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA (peft) settings."})
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    trust_remote_code: bool = opt(False, "Allow model code from the model folder.")


@dataclass
class DataConfig:
    train: str | None = opt(None, "Instruction data: .jsonl/.json path or datasets hub name.")
    valid: str | None = opt(None, "Validation instruction data (same formats).")
    valid_size: int = opt(0, "If `valid` is unset, hold out this many training examples for validation.", min=0)
    max_examples: int | None = opt(None, "Use at most this many training examples.", min=1)
    max_valid_examples: int | None = opt(None, "Use at most this many validation examples.", min=1)
    template: Literal["alpaca", "chat"] = opt(
        "alpaca", "Prompt rendering: MiniLLM/Alpaca template or the tokenizer's chat template."
    )
    max_prompt_length: int = opt(256, "Prompt token limit.", min=1)
    max_length: int = opt(512, "Prompt + response token limit.", min=2)
    long_prompt: Literal["drop", "truncate"] = opt(
        "drop", "Prompts over max_prompt_length: drop (counted) or left-truncate."
    )
    corpus: list[str] = opt([], "Plain-text corpus files/globs/folders (.txt, .jsonl with `text`) for PD and L_PT.")
    block_len: int = opt(256, "Token block length for packed corpus text.", min=8)
    valid_blocks: int = opt(16, "Corpus blocks held out for perplexity.", min=0)
    max_blocks: int | None = opt(None, "Use at most this many training corpus blocks.", min=1)


@dataclass
class RecipeConfig:
    output_dir: str = opt("", "Where the run writes everything.")
    seed: int = opt(42, "Global seed (data order, sampling, init).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "fp32",
        "Mixed precision for the student's forward (accelerate autocast; fp32 master weights); "
        "auto: bf16 where the GPU/CPU runs bf16 natively, else fp32.",
    )
    device: str = opt("auto", "auto, cpu, cuda, cuda:N (accelerate picks under `accelerate launch`).")
    resume: Literal["never", "auto"] = opt("never", "auto: continue from the newest complete checkpoint in output_dir.")
    overwrite: bool = opt(False, "Allow writing into an output_dir that holds another recipe's run.")
    tensorboard: bool = opt(False, "Also log metrics to TensorBoard (output_dir/tb).")
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice).", min=1)
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "The teacher."})
    student: StudentConfig = field(default_factory=StudentConfig, metadata={"help": "The student."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data."})
    stages: list[Any] = field(
        default_factory=list, metadata={"help": "Ordered stages, each a mapping with `type` and `name`."}
    )


@dataclass
class TrainConfig:
    """Settings every training stage shares (the one training loop reads these)."""

    type: str = opt("", "Stage type.")
    name: str = opt("", "Stage name (folder under output_dir); defaults to the type.")
    max_steps: int | None = opt(None, "Optimizer steps (takes precedence over epochs).", min=0)
    epochs: float = opt(1.0, "Passes over the training data when max_steps is unset.", min=0.0)
    lr: float = opt(5e-5, "Peak learning rate (AdamW).", min=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0.0)
    betas: list[float] = opt([0.9, 0.95], "AdamW betas.")
    scheduler: Literal["constant", "cosine", "linear", "wsd"] = opt("cosine", "LR schedule after warm-up.")
    warmup_steps: int = opt(0, "Linear warm-up steps.", min=0)
    decay_steps: int | None = opt(None, "wsd: length of the final decay phase (default 10% of steps).", min=0)
    batch_size: int = opt(8, "Micro-batch size per process.", min=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", min=1)
    grad_clip: float | None = opt(1.0, "Clip the gradient norm to this (null: off).", min=0.0)
    eval_every: int = opt(0, "Evaluate every N optimizer steps (0: only at the end).", min=0)
    save_every: int = opt(0, "Checkpoint every N optimizer steps (0: never mid-stage).", min=0)
    keep_last: int = opt(2, "Checkpoints kept (never deletes the only good one).", min=1)
    log_every: int = opt(1, "Log metrics every N optimizer steps.", min=1)
    eval_batches: int | None = opt(None, "Cap on validation batches (null: all).", min=1)
    nan_policy: Literal["skip", "stop"] = opt("skip", "Non-finite loss/grad: skip the step (counted) or stop at once.")
    max_bad_steps: int = opt(5, "Stop after this many non-finite steps in a row.", min=1)


# ----------------------------------------------------------------------------------------------
# Strict construction from plain data
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    bad = UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UserError:
                pass
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 as a string (no dot before the exponent): accept it.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    raise bad from None
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    return value


def _check_range(value: Any, meta: dict, where: str) -> None:
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    for v in values:
        if "min" in meta and isinstance(v, (int, float)) and v < meta["min"]:
            raise UserError(f"{where}: expected a value >= {meta['min']}, got {value!r}")
        if "max" in meta and isinstance(v, (int, float)) and v > meta["max"]:
            raise UserError(f"{where}: expected a value <= {meta['max']}, got {value!r}")
        if "gt" in meta and isinstance(v, (int, float)) and v <= meta["gt"]:
            raise UserError(f"{where}: expected a value > {meta['gt']}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise UserError(f"{where}: expected one of {meta['choices']}, got {value!r}")


def _key(where: str, name: str) -> str:
    return f"{where} {name}" if where.endswith(":") else f"{where}.{name}"


def build(cls: type, data: dict, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, strictly: unknown keys, wrong types, out-of-range values raise."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = (
                difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
                or sorted(
                    (f for f in fields if str(key).startswith(f) or f.startswith(str(key))), key=len, reverse=True
                )[:1]
            )
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(fields)})"
            raise UserError(f"{_key(where, str(key))}: unknown key{hint}")
    kwargs = {}
    for name, value in data.items():
        key_where = _key(where, name)
        v = _coerce(value, hints[name], key_where)
        _check_range(v, fields[name].metadata, key_where)
        kwargs[name] = v
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


# ----------------------------------------------------------------------------------------------
# Loading, overrides, dumping
# ----------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a YAML recipe") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        if isinstance(e, yaml.constructor.ConstructorError) and "constructor for the tag" in str(e.problem):
            # safe_load has no constructor for !!python/... tags (they could run code): refused
            tag = str(e.problem).split("tag ")[-1].strip("'").replace("tag:yaml.org,2002:", "!!")
            raise UserError(
                f"{path}{line}: unsupported YAML tag {tag} (recipes are plain YAML; "
                "python tags are refused because they could run code)"
            ) from None
        raise UserError(f"{path}{line}: YAML syntax error: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: YAML error: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of recipe keys at the top level")
    return data


def apply_override(data: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` override to the raw recipe mapping in place."""
    if "=" not in item:
        raise UserError(f"override '{item}': expected dotted.key=value")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _stage_by_name_or_index(node, part, key)
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise UserError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        raise UserError(f"override '{item}': name a stage key, e.g. stages.<name>.lr=...")
    node[last] = value


def _stage_by_name_or_index(stages: list, part: str, key: str) -> dict:
    if part.isdigit() and int(part) < len(stages):
        return stages[int(part)]
    for s in stages:
        if isinstance(s, dict) and (s.get("name") or s.get("type")) == part:
            return s
    names = [str(s.get("name") or s.get("type")) for s in stages if isinstance(s, dict)]
    raise UserError(f"override '{key}': no stage named '{part}' (stages: {', '.join(names) or 'none'})")


def parse_recipe(data: dict, source: str = "recipe") -> RecipeConfig:
    """Raw mapping -> validated RecipeConfig with typed stage configs."""
    from minidistill.stages import TYPES, stage  # the stage modules import this module: only here, never at import

    data = dict(data)
    raw_stages = data.pop("stages", [])
    recipe = build(RecipeConfig, data, f"{source}:")
    if not recipe.output_dir:
        raise UserError(f"{source}: output_dir: required (a folder for this run's outputs)")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise UserError(f"{source}: stages: expected a non-empty list of stages")
    stages, seen = [], set()
    for i, raw in enumerate(raw_stages):
        where = f"{source}: stages[{i}]"
        if not isinstance(raw, dict):
            raise UserError(f"{where}: expected a mapping with a 'type'")
        kind = raw.get("type")
        if kind not in TYPES:
            close = difflib.get_close_matches(str(kind), TYPES, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{where}.type: unknown stage type {kind!r}{hint}; expected one of {', '.join(TYPES)}")
        cfg = build(stage(kind).config, raw, f"{where} ({raw.get('name') or kind})")
        cfg.name = cfg.name or kind
        if cfg.name in seen:
            raise UserError(f"{where}.name: duplicate stage name '{cfg.name}' (stage names must be unique)")
        seen.add(cfg.name)
        stages.append(cfg)
    recipe.stages = stages
    for i, cfg in enumerate(stages):  # checks that need the other stages (e.g. pd reading a pd_store)
        check = stage(cfg.type).check_in_recipe
        if check is not None:
            check(recipe, i, f"{source}: stages[{i}] ({cfg.name})")
    _check_cross(recipe, source)
    return recipe


def _check_cross(recipe: RecipeConfig, source: str) -> None:
    if not recipe.teacher.model:
        raise UserError(f"{source}: teacher.model: required (hub id, folder, .gguf or pkg:<package>)")
    s = recipe.student
    if s.init == "pretrained" and not s.model:
        raise UserError(f"{source}: student.model: required when student.init is 'pretrained'")
    if s.init == "prune" and not (s.keep_layers or s.layer_stride):
        raise UserError(f"{source}: student: init 'prune' needs keep_layers or layer_stride")
    if recipe.data.max_prompt_length >= recipe.data.max_length:
        raise UserError(f"{source}: data.max_prompt_length: must be < data.max_length ({recipe.data.max_length})")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    data = read_yaml(path)
    for item in overrides or []:
        apply_override(data, item)
    return parse_recipe(data, str(path))


def to_dict(recipe: RecipeConfig) -> dict:
    return dataclasses.asdict(recipe)


def dump_yaml(recipe: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=None, width=100)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for the recipe reference in the README."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            sub = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(sub):
                rows += describe(sub, key + ".")
                continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
