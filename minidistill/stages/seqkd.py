"""SeqKD: fine-tune the student on responses sampled from the teacher (the MiniLLM paper's baseline).

1. The teacher samples one response per training prompt (temperature 1, top_p 1, top_k 0 as in the
   paper; configurable), seeded. The responses go to ``<stage>/teacher_responses.jsonl`` (one
   record per prompt, in training-data order; a Dolly-style file: ``instruction``, ``input``,
   the rendered ``prompt``, the teacher's ``output`` text and exact ``output_ids``, ``finished``
   (stopped with EOS before ``max_new_tokens``), the gold ``reference``, and ``index``/``source``
   of the training example). The sampling settings, the file's sha256 and sampling statistics go
   to the sidecar ``<stage>/teacher_responses.json``, reused on resume when the settings match
   (``minidistill.responses``, which the generate stage shares).
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
"""

from __future__ import annotations

from dataclasses import dataclass

from minidistill.config import opt
from minidistill.parts import responses, sources, token_kd
from minidistill.parts.token_kd import KDConfig
from minidistill.reporting.tracking import console
from minidistill.stages import Stage


@dataclass
class Config(KDConfig):
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


def cross_tokenizer(cfg) -> tuple[str, str]:
    """``Stage.cross_tokenizer``: the samples are text, so SeqKD works across tokenizers; its KD term needs a uld kind."""
    if cfg.kd_ratio == 0:
        return "text", ""
    return token_kd.cross_tokenizer(cfg)


def run(run, cfg: Config, student):
    records = responses.teacher_responses(run, cfg)
    valid = sources.instruction_rows(run, "valid")
    if run.cross_tokenizer or token_kd.uses_xtok(cfg):
        rows, examples = responses.rows_from_text(run, records)
        valid_examples = sources.instruction_examples(run, "valid") if token_kd.uses_xtok(cfg) else None
        return token_kd.train_on_rows(run, cfg, student, rows, valid, examples, valid_examples)
    prompt_ids, kept = sources.prompts(run)
    rows, truncated = responses.rows_from_responses(
        records, prompt_ids, kept, run.tokenizer.eos_token_id, run.recipe.data.max_length
    )
    if truncated:
        console.print(
            f"stage '{cfg.name}': {truncated} teacher responses cut to data.max_length={run.recipe.data.max_length}"
        )
    return token_kd.train_on_rows(run, cfg, student, rows, valid)


STAGE = Stage(
    "seqkd",
    Config,
    run,
    generates=True,
    needs_instructions=True,
    cross_tokenizer=cross_tokenizer,
    served_teacher=token_kd.served_teacher,
)
