"""Instruction-following evaluation (MiniLLM protocol): sample per seed, score ROUGE-L.

    python eval/instruct_eval.py --model PATH --data FILE --out DIR [options]

Defaults follow the paper: temperature 1, top_p 1, top_k 0, no_repeat_ngram 6, seeds 10..50,
prompts <= 256 tokens (longer ones dropped), 256 new tokens, ROUGE-L F x100.
Writes DIR/generations.jsonl (one line per seed x example) and DIR/summary.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from minidistill.errors import UserError  # noqa: E402
from minidistill.generation.evaluation import parse_int_list  # noqa: E402
from minidistill.training.checkpoint import write_text_atomic  # noqa: E402


def _fallback_load_model(path: str, *, gguf_file: str | None = None, dtype: str = "fp32", device: str = "cpu"):
    """Stand-in for minidistill.models.load_model while that module does not exist."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).exists():
        raise UserError(f"{path}: model path not found")
    if gguf_file is not None and not (Path(path) / gguf_file).is_file():
        raise UserError(f"{Path(path) / gguf_file}: GGUF file not found")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: could not load a causal LM and tokenizer ({first})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _load_model(path: str, *, gguf_file: str | None, dtype: str, device: str):
    try:
        from minidistill.models import load_model
    except ImportError as e:
        # Fall back only while the module (or its load_model) does not exist yet, not when it is broken.
        if importlib.util.find_spec("minidistill.models") is not None and "load_model" not in str(e):
            raise
        load_model = _fallback_load_model
    return load_model(path, gguf_file=gguf_file, dtype=dtype, device=device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model: HF folder, .gguf file, hub id or pkg:<package>")
    p.add_argument("--data", required=True, help="instruction data: .jsonl / .json file or hub name")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--seeds", default="10,20,30,40,50")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-repeat-ngram", type=int, default=6)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--long-prompt", choices=["drop", "truncate"], default="drop")
    p.add_argument("--template", choices=["alpaca", "chat"], default="alpaca")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation and write the two output files; returns the summary."""
    from minidistill.data import load_instructions
    from minidistill.generation.evaluation import evaluate_instructions

    seeds = parse_int_list(args.seeds, "--seeds", "10,20,30")
    if args.max_examples is not None and args.max_examples < 1:
        raise UserError(f"--max-examples: must be at least 1, got {args.max_examples}")
    examples = load_instructions(args.data)
    if args.max_examples is not None:
        examples = examples[: args.max_examples]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is not a directory")

    start = time.time()
    model, tokenizer = _load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "template": args.template,
        "seeds": seeds,
        "max_prompt_length": args.max_prompt_length,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "no_repeat_ngram_size": args.no_repeat_ngram,
        "long_prompt": args.long_prompt,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "max_examples": args.max_examples,
    }
    result = evaluate_instructions(
        model,
        tokenizer,
        examples,
        template=args.template,
        seeds=seeds,
        max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        no_repeat_ngram_size=args.no_repeat_ngram,
        long_prompt=args.long_prompt,
        progress=not args.no_progress,
        vocab_size=len(tokenizer),
    )
    generations = result.pop("generations")
    summary = {
        "rougeL": result["rougeL"],
        "rougeL_per_seed": {str(k): v for k, v in result["rougeL_per_seed"].items()},
        "rougeL_std_over_seeds": result["rougeL_std_over_seeds"],
        "mean_length": result["mean_length"],
        "mean_length_per_seed": {str(k): v for k, v in result["mean_length_per_seed"].items()},
        "n_examples": result["n_examples"],
        "n_loaded": len(examples),
        "n_dropped_long_prompt": result["n_dropped_long_prompt"],
        "n_truncated_prompt": result["n_truncated_prompt"],
        "model": args.model,
        "gguf_file": args.gguf_file,
        "data": args.data,
        "settings": settings,
        "seconds": round(time.time() - start, 2),
    }
    write_text_atomic(out / "generations.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    per_seed = ", ".join(f"{k}: {v:.2f}" for k, v in summary["rougeL_per_seed"].items())
    print(
        f"ROUGE-L {summary['rougeL']:.2f} ({per_seed}) on {summary['n_examples']} examples; "
        f"mean length {summary['mean_length']:.1f} tokens -> {Path(args.out) / 'summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
