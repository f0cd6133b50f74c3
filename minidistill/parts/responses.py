"""The teacher's responses to the recipe's prompts, as the seqkd and generate stages use them.

The teacher samples one response per prompt (``Teacher.generate``; temperature 1, top_p 1, top_k
0 as in the paper; configurable), seeded. The responses go to ``<stage>/teacher_responses.jsonl``
(one record per prompt, in data order; a Dolly-style file: ``instruction``, ``input``, the
rendered ``prompt``, the teacher's ``output`` text and exact ``output_ids``, ``finished`` (stopped
with EOS before ``max_new_tokens``), the gold ``reference``, and ``index``/``source`` of the
example). The sampling settings, the file's sha256 and sampling statistics go to the sidecar
``<stage>/teacher_responses.json``. Both are written atomically (the sidecar is removed first and
written last), and a later run (``resume=auto`` after an interruption) reuses the file when the
sidecar's settings equal the current ones and the checksum matches, so it never resamples;
anything else (settings changed, file edited or half-written) resamples.

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

from minidistill import data
from minidistill.parts import sources
from minidistill.reporting.tracking import console
from minidistill.training import checkpoint as ckpt

FORMAT = 1
RESPONSES = "teacher_responses.jsonl"
SIDECAR = "teacher_responses.json"


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
        "teacher_dtype": run.teacher.dtype_name,
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
            new = run.teacher.generate([prompt_ids[i] for i in idx], settings, batch_seed(settings["seed"], b))
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
    prompt_ids, kept = sources.prompts(run, split, teacher=True)
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
                "prompt": data.render_prompt(ex, d.template, run.teacher.tokenizer),
                "output": run.teacher.tokenizer.decode(ids, skip_special_tokens=True).strip(),
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
