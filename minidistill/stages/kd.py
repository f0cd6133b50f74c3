"""KD: word-level knowledge distillation on the gold responses (the MiniLLM paper's "KD" baseline).

Teacher-forced on the instruction data: student and teacher see the same ``input_ids`` (prompt +
gold response + EOS); at every response position

    loss = (1 - kd_ratio) * CE(gold token) + kd_ratio * D(teacher || student)

summed over response tokens (the loop divides by the global token count). The MiniLLM baseline is
kd_ratio 0.5, temperature 1 and D = -sum_v p(v) log q(v) (soft cross-entropy; the official code's
``get_distil_loss``). The default ``kind`` here is ``fkl`` = that minus the teacher entropy: the
same gradient, but 0 when the student matches the teacher; ``kind: ce`` logs the official value.
Distributions are compared over the first ``run.vocab_size`` logits (heads padded beyond the
tokenizer are ignored); the CE term uses the student's whole head, exactly as SFT does.

Validation: CE on the gold validation responses (the SFT validation loss, ``valid/loss``, which
picks ``<stage>/best``), plus the divergence to the teacher (``valid/kd``) and the training mix
(``valid/total``) when kd_ratio > 0.

Across tokenizers (``kind: uld`` or ``uld_hybrid``, ``minidistill.xtok``): the teacher sees its
own rendering of the prompt and its own tokenization of the same response text; the divergence
is taken at the paired positions (student and teacher tokens that start at the same character)
and averaged over them (the loss has two terms: CE per response token, the divergence per pair),
so ``kd`` is per pair and ``aligned`` is the share of response tokens that have a pair. The same
kinds work with one tokenizer (then every token pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

from minidistill.parts import sources
from minidistill.parts.token_kd import KDConfig, cross_tokenizer, served_teacher, train_on_rows, uses_xtok
from minidistill.stages import Stage


@dataclass
class Config(KDConfig):
    pass


def run(run, cfg: Config, student):
    rows, valid = sources.instruction_rows(run, "train"), sources.instruction_rows(run, "valid")
    if uses_xtok(cfg):
        examples = sources.instruction_examples(run, "train"), sources.instruction_examples(run, "valid")
        return train_on_rows(run, cfg, student, rows, valid, *examples)
    return train_on_rows(run, cfg, student, rows, valid)


STAGE = Stage(
    "kd", Config, run, needs_instructions=True, cross_tokenizer=cross_tokenizer, served_teacher=served_teacher
)
