"""SeqKD: fine-tune the student on responses sampled from the teacher (the MiniLLM paper's baseline).

1. The teacher samples one response per training prompt (temperature 1, top_p 1, top_k 0 as in the
   paper; configurable), seeded. The responses go to ``<stage>/teacher_responses.jsonl`` (one
   record per prompt, in training-data order; a Dolly-style file: ``instruction``, ``input``,
   the rendered ``prompt``, the teacher's ``output`` text and exact ``output_ids``, ``finished``
   (stopped with EOS before ``max_new_tokens``), the gold ``reference``, and ``index``/``source``
   of the training example). The sampling settings, the file's sha256 and sampling statistics go
   to the sidecar ``<stage>/teacher_responses.json``. Both are written atomically (the sidecar is
   removed first and written last), and a later run (``resume=auto`` after an interruption) reuses
   the file when the sidecar's settings equal the current ones and the checksum matches, so it
   never resamples; anything else (settings changed, file edited or half-written) resamples.
2. SFT on those responses: the student is trained on exactly the sampled token ids after exactly
   the prompt ids the teacher saw (no decode/re-encode round trip); EOS is appended only to
   responses the teacher finished, so a response cut at ``max_new_tokens`` does not teach the
   student to stop there. Optionally mixed with word-level KD on those sequences (``kd_ratio``:
   0 here = pure SeqKD as in the paper; the official scripts used 0.5). Validation and the
   ``best/`` export are the KD stage's: gold-response CE on the validation set (+ ``kd``).

Across tokenizers the teacher samples from its own rendering of each prompt (its tokenizer, its
chat template) and the records hold its ids; the student trains on the text (prompt rendered and
response tokenized with the student's tokenizer), and a ``kd_ratio`` > 0 needs ``kind: uld`` or
``uld_hybrid`` (``stages/kd.py``).

Sampling is world-size independent: the prompts are sorted by length into batches of
``gen_batch_size`` (left-padded, as ``evaluation.generate_ids`` does) and batch ``b`` is sampled
with seed ``gen_seed * 100003 + b``. With several processes, batch ``b`` is sampled by process
``b % world``; the records are gathered to every process and the main process writes the file, so
1 or N processes produce the same samples on the same hardware.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from .. import checkpoint as ckpt
from .. import data
from ..config import opt
from ..evaluation import generate_ids
from ..tracking import console
from . import Stage, kd
from .sft import instruction_examples, instruction_rows

FORMAT = 1
RESPONSES = "teacher_responses.jsonl"
SIDECAR = "teacher_responses.json"


@dataclass
class Config(kd.Config):
    kd_ratio: float = opt(
        0.0,
        "Weight of word-level KD on the teacher's samples; (1 - kd_ratio) weighs their CE "
        "(paper's SeqKD: 0; the official scripts: 0.5).",
        min=0.0,
        max=1.0,
    )
    max_new_tokens: int | None = opt(
        None,
        "Teacher response token limit (null: data.max_length - data.max_prompt_length, "
        "256 with the defaults, as the paper's 512 total / 256 prompt).",
        min=1,
    )
    gen_temperature: float = opt(1.0, "Teacher sampling temperature (paper: 1; 0 = greedy).", min=0.0)
    gen_top_p: float = opt(1.0, "Teacher nucleus sampling top_p (paper: 1).", gt=0.0, max=1.0)
    gen_top_k: int = opt(0, "Teacher top-k sampling (0: off, as the paper).", min=0)
    gen_batch_size: int = opt(8, "Prompts per teacher generate() call (part of the sampling settings).", min=1)
    gen_seed: int | None = opt(None, "Sampling seed (null: the recipe seed).")


# ---- sampling ---------------------------------------------------------------------------------


def prompts(run, split: str = "train", teacher: bool = False) -> tuple[list[list[int]], list[int]]:
    """Prompt ids of a split's examples (as tokenize_prompts keeps them) and their example indices;
    ``teacher``: in the teacher's tokenizer (the same as the student's unless they differ)."""
    d = run.recipe.data
    tok = teacher_tokenizer(run) if teacher else run.tokenizer

    def make():
        ids, _, stats = data.tokenize_prompts(
            run.instructions(split),
            tok,
            template=d.template,
            max_prompt_length=d.max_prompt_length,
            long_prompt=d.long_prompt,
        )
        return ids, list(stats.kept_indices)

    other = "teacher_" if tok is not run.tokenizer else ""
    return run.cached(f"instructions/seqkd_{other}prompts/{split}", make)


def teacher_tokenizer(run):
    return getattr(run, "teacher_tokenizer", None) or run.tokenizer


def teacher_vocab(run) -> int:
    return getattr(run, "teacher_vocab_size", None) or run.vocab_size


def max_new_tokens(run, cfg) -> int:
    d = run.recipe.data
    return cfg.max_new_tokens if cfg.max_new_tokens is not None else d.max_length - d.max_prompt_length


def sampling_settings(run, cfg, prompt_ids: list[list[int]]) -> dict:
    """Everything the samples depend on; the file is reused only when these are equal."""
    r, d = run.recipe, run.recipe.data
    return {
        "format": FORMAT,
        "teacher": r.teacher.model,
        "gguf_file": r.teacher.gguf_file,
        "teacher_dtype": str(next(run.teacher.parameters()).dtype).replace("torch.", ""),
        "temperature": float(cfg.gen_temperature),
        "top_p": float(cfg.gen_top_p),
        "top_k": int(cfg.gen_top_k),
        "max_new_tokens": max_new_tokens(run, cfg),
        "seed": int(cfg.gen_seed if cfg.gen_seed is not None else r.seed),
        "batch_size": int(cfg.gen_batch_size),
        "template": d.template,
        "max_prompt_length": d.max_prompt_length,
        "long_prompt": d.long_prompt,
        "n_prompts": len(prompt_ids),
        "prompts_sha256": hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest(),
    }


def sample_batches(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt positions grouped into generation batches: longest first (little padding), stable order."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batch_seed(seed: int, b: int) -> int:
    return seed * 100_003 + b


def sample(run, settings: dict, prompt_ids: list[list[int]]) -> list[tuple[int, list[int]]]:
    """This process's share of the samples: [(prompt position, new token ids without EOS)]."""
    from tqdm.auto import tqdm

    acc = run.accelerator
    batches = sample_batches(prompt_ids, settings["batch_size"])
    mine = [b for b in range(len(batches)) if b % acc.num_processes == acc.process_index]
    out: list[tuple[int, list[int]]] = []
    with tqdm(
        total=sum(len(batches[b]) for b in mine),
        desc="teacher samples",
        unit="prompt",
        disable=not acc.is_main_process,
        dynamic_ncols=True,
    ) as bar:
        for b in mine:
            idx = batches[b]
            new = generate_ids(
                run.teacher,
                teacher_tokenizer(run),
                [prompt_ids[i] for i in idx],
                max_new_tokens=settings["max_new_tokens"],
                batch_size=len(idx),
                temperature=settings["temperature"],
                top_p=settings["top_p"],
                top_k=settings["top_k"],
                seed=batch_seed(settings["seed"], b),
                progress=False,
                vocab_size=teacher_vocab(run),
            )
            out.extend(zip(idx, new))
            bar.update(len(idx))
    return out


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_responses(stage_dir, settings: dict) -> tuple[list[dict] | None, str]:
    """(records, '') when the saved responses match ``settings``; else (None, why not)."""
    path, side = stage_dir / RESPONSES, stage_dir / SIDECAR
    if not path.is_file() or not side.is_file():
        return None, "no saved teacher responses"
    try:
        meta = json.loads(side.read_text())
    except ValueError:
        return None, f"{side} is corrupt"
    if meta.get("settings") != settings:
        old = meta.get("settings") or {}
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        return None, f"sampling settings changed ({', '.join(diff)})"
    text = path.read_text()
    if _sha256(text) != meta.get("sha256"):
        return None, f"{path} does not match the checksum in {side.name}"
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if len(records) != settings["n_prompts"]:
        return None, f"{path} has {len(records)} records, expected {settings['n_prompts']}"
    return records, ""


def save_responses(stage_dir, settings: dict, records: list[dict], stats: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    path, side = stage_dir / RESPONSES, stage_dir / SIDECAR
    side.unlink(missing_ok=True)  # never a valid sidecar next to a half-replaced file
    text = "".join(json.dumps(r) + "\n" for r in records)
    ckpt.write_text_atomic(path, text)
    ckpt.write_json_atomic(side, {"settings": settings, "sha256": _sha256(text), "n_records": len(records), **stats})


def teacher_responses(run, cfg, split: str = "train") -> list[dict]:
    """The teacher's responses for every prompt of ``split``: loaded if saved with these settings, else sampled."""
    from accelerate.utils import broadcast_object_list, gather_object

    acc = run.accelerator
    stage_dir = run.stage_dir(cfg.name) if split == "train" else run.stage_dir(cfg.name) / split
    prompt_ids, kept = prompts(run, split, teacher=True)
    settings = sampling_settings(run, cfg, prompt_ids)
    found = [None]
    if acc.is_main_process:
        records, why = load_responses(stage_dir, settings)
        if records is not None:
            console.print(f"stage '{cfg.name}': reusing {len(records)} teacher responses from {stage_dir / RESPONSES}")
        else:
            console.print(f"stage '{cfg.name}': sampling {len(prompt_ids)} teacher responses ({why})")
        found = [records]
    if acc.num_processes > 1:
        broadcast_object_list(found)
    if found[0] is not None:
        return found[0]

    t0 = time.perf_counter()
    pieces = sample(run, settings, prompt_ids)
    if acc.num_processes > 1:
        pieces = gather_object(pieces)
    seconds = time.perf_counter() - t0
    new_ids = dict(pieces)
    examples = run.instructions(split)
    d = run.recipe.data
    records = []
    for k, i in enumerate(kept):
        ex, ids = examples[i], new_ids[k]
        records.append(
            {
                "index": i,
                "source": ex.source,
                "instruction": ex.instruction,
                "input": ex.input,
                "prompt": data.render_prompt(ex, d.template, teacher_tokenizer(run)),
                "output": teacher_tokenizer(run).decode(ids, skip_special_tokens=True).strip(),
                "output_ids": ids,
                "finished": len(ids) < settings["max_new_tokens"],
                "reference": ex.response,
            }
        )
    n_tokens = sum(len(r["output_ids"]) for r in records)
    stats = {
        "sample_seconds": round(seconds, 3),
        "generated_tokens": n_tokens,
        "mean_response_tokens": n_tokens / max(len(records), 1),
        "finished_fraction": sum(r["finished"] for r in records) / max(len(records), 1),
        "world_size": acc.num_processes,
    }
    if acc.is_main_process:
        save_responses(stage_dir, settings, records, stats)
        console.print(
            f"stage '{cfg.name}': {len(records)} responses, {stats['mean_response_tokens']:.1f} tokens on "
            f"average, {100 * stats['finished_fraction']:.0f}% ended with EOS, {seconds:.1f} s "
            f"({n_tokens / max(seconds, 1e-9):.1f} tokens/s) -> {stage_dir / RESPONSES}"
        )
    run.log(cfg.name, 0, {f"teacher/{k}": v for k, v in stats.items()})
    acc.wait_for_everyone()
    return records


def rows_from_responses(
    records: list[dict], prompt_ids: list[list[int]], kept: list[int], eos: int, max_length: int
) -> tuple[list[dict], int]:
    """SFT rows (input_ids, labels, prompt_length) on the sampled ids; returns (rows, n_truncated)."""
    position = {i: k for k, i in enumerate(kept)}
    rows, truncated = [], 0
    for rec in records:
        p = prompt_ids[position[rec["index"]]]
        r = list(rec["output_ids"]) + ([eos] if rec["finished"] else [])
        room = max_length - len(p)
        if len(r) > room:
            r, truncated = r[:room], truncated + 1
        if not r:
            continue
        rows.append({"input_ids": p + r, "labels": [data.IGNORE_INDEX] * len(p) + r, "prompt_length": len(p)})
    return rows, truncated


def rows_from_text(run, records: list[dict]) -> tuple[list[dict], list]:
    """Across tokenizers (or with a cross-tokenizer kind): SFT rows of the teacher's response
    texts in the student's tokenizer, and the examples behind them, row for row."""
    d, examples = run.recipe.data, run.instructions("train")
    texts = [
        data.Example(
            instruction=examples[r["index"]].instruction,
            input=examples[r["index"]].input,
            outputs=[r["output"]],
            prompt=examples[r["index"]].prompt,
            messages=examples[r["index"]].messages,
            source=r["source"],
            complete=r["finished"],
        )
        for r in records
    ]
    rows, stats = data.tokenize_sft(
        texts,
        run.tokenizer,
        template=d.template,
        max_prompt_length=d.max_prompt_length,
        max_length=d.max_length,
        long_prompt=d.long_prompt,
    )
    return rows, [texts[i] for i in stats.kept_indices]


def cross_tokenizer(cfg) -> tuple[str, str]:
    """``Stage.cross_tokenizer``: the samples are text, so SeqKD works across tokenizers; its KD term needs a uld kind."""
    if cfg.kd_ratio == 0:
        return "text", ""
    return kd.cross_tokenizer(cfg)


def run(run, cfg: Config, student):
    records = teacher_responses(run, cfg)
    if run.cross_tokenizer or kd.uses_xtok(cfg):
        rows, examples = rows_from_text(run, records)
        valid = instruction_rows(run, "valid")
        valid_examples = instruction_examples(run, "valid") if kd.uses_xtok(cfg) else None
        return kd.train_on_rows(run, cfg, student, rows, valid, examples, valid_examples)
    prompt_ids, kept = prompts(run)
    rows, truncated = rows_from_responses(
        records, prompt_ids, kept, run.tokenizer.eos_token_id, run.recipe.data.max_length
    )
    if truncated:
        console.print(
            f"stage '{cfg.name}': {truncated} teacher responses cut to data.max_length={run.recipe.data.max_length}"
        )
    return kd.train_on_rows(run, cfg, student, rows, instruction_rows(run, "valid"))


STAGE = Stage("seqkd", Config, run, generates=True, needs_instructions=True, cross_tokenizer=cross_tokenizer)
