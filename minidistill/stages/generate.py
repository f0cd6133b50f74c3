"""Teacher data: the teacher answers the recipe's prompts; later stages learn from its answers.

For each split in ``splits`` the teacher samples one response per prompt (saved as JSONL with
its sampling settings under ``<stage>/``, reused when the settings match, exactly as the SeqKD
stage does). The split's examples are then replaced by (prompt, teacher response) pairs, so SFT,
KD and the MiniLLM validation score against the teacher's own answers (an answer cut at
``max_new_tokens`` is marked incomplete: SFT/KD train on it without an EOS, so the student is not
taught to stop where the teacher was cut); with ``corpus: true``
the prompt+response texts of the train split also become the plain-text corpus (PD, L_PT).
This is what lets the quickstart run from prompts alone. With a teacher of another tokenizer the
teacher reads its own rendering of each prompt and writes text; the stages after it tokenize that
text with the student's tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from minidistill import data
from minidistill.config import opt
from minidistill.parts import responses
from minidistill.reporting.tracking import console
from minidistill.stages import Stage


@dataclass
class Config:
    type: str = opt("generate", "Stage type.")
    name: str = opt("", "Stage name (folder under output_dir).")
    splits: list[str] = opt(["train", "valid"], "Instruction splits whose references become the teacher's responses.")
    corpus: bool = opt(True, "Also use the train split's prompt+response texts as the plain-text corpus.")
    max_new_tokens: int | None = opt(
        None, "Response token limit (null: data.max_length - data.max_prompt_length).", min=1
    )
    gen_temperature: float = opt(1.0, "Teacher sampling temperature (0 = greedy).", min=0.0)
    gen_top_p: float = opt(1.0, "Teacher top-p.", gt=0.0, max=1.0)
    gen_top_k: int = opt(0, "Teacher top-k (0 = off).", min=0)
    gen_batch_size: int = opt(16, "Prompts per teacher generate() call.", min=1)
    gen_seed: int | None = opt(None, "Sampling seed (null: the recipe seed).")

    def validate(self, where: str) -> None:
        bad = [s for s in self.splits if s not in ("train", "valid")]
        if bad or not self.splits:
            from minidistill.errors import UserError

            raise UserError(f"{where}.splits: expected a non-empty list of 'train'/'valid', got {self.splits}")


def run(run, cfg: Config, student) -> None:
    for split in cfg.splits:
        if not run.instructions(split):
            continue
        records = responses.teacher_responses(run, cfg, split)
        # an answer cut at max_new_tokens stays a reference but is no EOS-terminated SFT target
        examples = [
            data.Example(
                instruction=r["instruction"],
                input=r["input"],
                outputs=[r["output"]],
                prompt=r["prompt"],
                source=r["source"],
                complete=r["finished"],
            )
            for r in records
        ]
        run.set_instructions(split, examples)
        console.print(f"stage '{cfg.name}': {split} split now has {len(examples)} teacher responses as references")
        if split == "train" and cfg.corpus:
            run.set_corpus_texts(
                [r["prompt"] + r["output"] for r in records],
                f"stage '{cfg.name}' generated text",
                complete=[r["finished"] for r in records],  # a cut answer gets no EOS in the text either
            )
    return None


STAGE = Stage(
    "generate",
    Config,
    run,
    trains=False,
    generates=True,
    needs_instructions=True,
    writes_responses=True,
    provides_corpus=lambda cfg: cfg.corpus and "train" in cfg.splits,
    cross_tokenizer=lambda cfg: ("text", ""),  # the teacher writes text with its own tokenizer
)
