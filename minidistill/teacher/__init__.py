"""The teacher, as every stage sees it: one object, ``run.teacher``, and nothing reaches around it.

What a stage needs from a teacher is one of three things:

(a) per-token log-probs of given responses, aligned to the student's tokens (MiniLLM's rewards):
    :meth:`Teacher.response_logp`;
(b) its distribution at the student's positions, full or top-p/top-k with the rest mass (KD, PD,
    L_PT, the single-step term): :meth:`Teacher.logits`, :meth:`Teacher.target`,
    :meth:`Teacher.response_logits`; across tokenizers, at the paired positions only
    (:meth:`Teacher.pair_logits` over :meth:`Teacher.side_of_rows` / :meth:`Teacher.side_of_blocks`);
(c) generated text (SeqKD, generate): :meth:`Teacher.generate`.

Implementations: :class:`Teacher` is a local transformers model, with the student's tokenizer (every
fast path kept: the sampler runs it in lockstep and keeps its hidden states, the loss rebuilds its
logits with one LM-head matmul, the fused kernels read its logits) or with its own (the
``xtok.Aligner`` of the pair, built once with one set of vocabulary limits; then the teacher reads
its own rendering of each prompt and its own tokenization of the text). :class:`StoredTeacher` is
the offline top-p-k logit store PD reads (``pd_store``). What a teacher cannot give (a full
distribution or lockstep mixing across tokenizers, a distribution at positions a store does not
hold) is refused here, in one place: :func:`check_stages` asks each stage what it needs
(``Stage.cross_tokenizer``) before anything is written, and the methods themselves refuse with one
line.

Precision: the teacher's forwards run under the run's autocast (the teacher owns it, as the loop
owns the student's), so no stage opens one.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from minidistill import data, models
from minidistill.errors import UserError, named
from minidistill.functional import xtok
from minidistill.functional.losses import Truncated
from minidistill.models import logits as fwd


@dataclass
class Teacher:
    """A local teacher model. ``aligner`` is set when the student reads the teacher through
    character spans: another tokenizer, or a cross-tokenizer loss (kind uld) with the same one."""

    model: Any
    tokenizer: Any  # the teacher's own
    name: str  # teacher.model of the recipe (for messages and sampling settings)
    vocab_size: int | None = None  # the teacher's usable vocabulary (set by :meth:`check_vocab`)
    student_tokenizer: Any = None  # None: the teacher's (one tokenizer)
    aligner: xtok.Aligner | None = None
    autocast: Callable = nullcontext
    served = False  # a model in this process (``served.ServedTeacher``: behind a server)

    # ---- what this teacher is ------------------------------------------------------------------
    @property
    def cross(self) -> bool:
        """The student has another tokenizer (then only text, spans and paired positions connect them)."""
        return self.student_tokenizer is not None and self.student_tokenizer is not self.tokenizer

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def lockstep(self):
        """The model the sampler runs next to the student for teacher-mixed sampling (one vocabulary)."""
        self._refuse_cross("teacher-mixed sampling (a token drawn from a*p + (1-a)*q)")
        return self.model

    def _refuse_cross(self, what: str) -> None:
        if self.cross:
            raise UserError(
                f"teacher.model '{self.name}': {what} needs the student's tokenizer; this teacher has its own "
                "(README, 'Cross-tokenizer distillation')"
            )

    def shared(self):
        """The shared-vocabulary map of the pair (built once, with the limits :meth:`check_vocab` set)."""
        return self.aligner.shared()

    def check_vocab(self, student, student_vocab: int) -> int:
        """Check both heads against their tokenizers; returns the student's usable vocabulary and sets
        the teacher's (one tokenizer: one vocabulary for both). Builds the aligner's shared map once."""
        if self.aligner is None:
            self.vocab_size = models.check_vocab(self.model, student, self.tokenizer)
            return self.vocab_size
        self.vocab_size = models.check_vocab(self.model, self.model, self.tokenizer, where="teacher")
        self.aligner.shared(student_vocab, self.vocab_size)  # the first call fixes the limits
        return student_vocab

    # ---- (b) distributions at the student's positions ------------------------------------------
    def logits(self, input_ids, attention_mask=None, vocab: int | None = None) -> torch.Tensor:
        """No-grad next-token logits (B, L-1, V) at every position but the last (one tokenizer)."""
        self._refuse_cross("a full distribution at the student's positions")
        with torch.no_grad(), self.autocast():
            return fwd.next_token_logits(self.model, input_ids, attention_mask, vocab=vocab)

    def block_logits(self, input_ids, vocab: int) -> torch.Tensor:
        """No-grad logits at every position of text blocks (B, T, V), as the logit store keeps them."""
        self._refuse_cross("a full distribution at the student's positions")
        with torch.no_grad(), self.autocast():
            z = self.model(input_ids=input_ids).logits
        return z[..., :vocab] if z.shape[-1] > vocab else z

    def target(self, input_ids, top_p: float, top_k: int | None, vocab: int, block_idx=None):
        """PD's target for text blocks (B, T): the top-p-k truncation (B, T-1, K) of the raw
        log-probs, or the full logits (``top_k`` 0/None). ``block_idx`` is for stores."""
        from minidistill.models.logit_store import truncate_raw

        z = self.logits(input_ids, vocab=vocab)
        return truncate_raw(z, top_p, top_k) if top_k else z

    def response_logits(self, batch: dict, vocab: int) -> torch.Tensor:
        """(B, T, V) logits predicting each response token of a rollout minibatch: from the hidden
        states the sampler kept (one LM-head matmul) when there are any, else a teacher forward."""
        self._refuse_cross("a full distribution at the student's positions")
        with torch.no_grad(), self.autocast():
            return fwd.response_logits(
                self.model,
                batch["prompt_ids"],
                batch["prompt_mask"],
                batch["response_ids"],
                batch["response_mask"],
                vocab,
                hidden=batch.get("teacher_hidden"),
            )

    def pair_logits(self, side: dict):
        """``f(start, stop) -> (n, Vt)``: no-grad logits at the paired teacher positions of a
        batch's teacher side (:meth:`side_of_rows`, :meth:`side_of_blocks`)."""
        with self.autocast():
            return fwd.logits_at(
                self.model, side["teacher_ids"], side["teacher_mask"], side["pairs_t"], self.vocab_size
            )

    # ---- the teacher's side of a student batch (across tokenizers) -----------------------------
    def side_of_rows(self, rows: list[dict], examples: list, template: str) -> list[dict]:
        """Instruction ``rows`` (student prompt + response ids) with the teacher's side: its own
        prompt rendering, its tokenization of the same response text, and the paired positions."""
        prefix = data.special_affixes(self.tokenizer)[0]
        out = []
        for row, ex in zip(rows, examples, strict=True):
            p = row["prompt_length"]
            view = self.aligner.teacher_view(row["input_ids"][p:])
            tp = data.encode_prompt(data.render_prompt(ex, template, self.tokenizer), self.tokenizer, prefix)
            out.append(
                {
                    **row,
                    "teacher_ids": tp + view.ids,
                    "teacher_prompt_length": len(tp),
                    "pairs": (view.student_pairs, view.teacher_pairs),
                }
            )
        return out

    def collate_side(self, rows: list[dict], student_len: int, device) -> dict:
        """Right-padded teacher rows of :meth:`side_of_rows` and the pairs as flat indices into the
        (B * (L-1)) next-token positions of each side (student rows ``student_len`` wide)."""
        width = max(len(r["teacher_ids"]) for r in rows)
        t_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        t_mask = torch.zeros((len(rows), width), dtype=torch.long)
        ls, lt = student_len - 1, width - 1
        s_flat, t_flat = [], []
        for b, r in enumerate(rows):
            t_ids[b, : len(r["teacher_ids"])] = torch.as_tensor(r["teacher_ids"])
            t_mask[b, : len(r["teacher_ids"])] = 1
            ps, pt = r["prompt_length"] - 1, r["teacher_prompt_length"] - 1
            si, ti = r["pairs"]
            s_flat += [b * ls + ps + i for i in si]
            t_flat += [b * lt + pt + j for j in ti]
        return {
            "teacher_ids": t_ids.to(device),
            "teacher_mask": t_mask.to(device),
            "pairs_s": torch.tensor(s_flat, dtype=torch.long, device=device),
            "pairs_t": torch.tensor(t_flat, dtype=torch.long, device=device),
        }

    def side_of_blocks(self, ids: torch.Tensor) -> dict:
        """The teacher's tokenization of student text blocks ``ids`` (B, T): right-padded teacher
        ids and mask, and the pairs as flat indices into the (B * (L-1)) next-token positions of
        each side (student token i >= 1 is predicted at position i-1; the teacher's BOS in front)."""
        prefix = data.special_affixes(self.tokenizer)[0]
        views = [self.aligner.teacher_view(row) for row in ids.tolist()]
        width = max(len(prefix) + len(v.ids) for v in views)
        t_ids = torch.full((len(views), width), self.pad_id, dtype=torch.long)
        t_mask = torch.zeros((len(views), width), dtype=torch.long)
        ls, lt, n0 = ids.shape[1] - 1, width - 1, len(prefix)
        s_flat, t_flat = [], []
        for b, v in enumerate(views):
            row = prefix + v.ids
            t_ids[b, : len(row)] = torch.as_tensor(row)
            t_mask[b, : len(row)] = 1
            for i, j in zip(v.student_pairs, v.teacher_pairs):
                if i >= 1 and n0 + j >= 1:
                    s_flat.append(b * ls + i - 1)
                    t_flat.append(b * lt + n0 + j - 1)
        dev = ids.device
        return {
            "teacher_ids": t_ids.to(dev),
            "teacher_mask": t_mask.to(dev),
            "pairs_s": torch.tensor(s_flat, dtype=torch.long, device=dev),
            "pairs_t": torch.tensor(t_flat, dtype=torch.long, device=dev),
        }

    # ---- (a) per-token log-probs of responses --------------------------------------------------
    def response_logp(self, ro, settings, *, chunk: int, teacher_prompts=None, keep_hidden: bool = False):
        """log p(y_t) of a rollout's response tokens (B, T) under the processed distribution
        (``settings`` = temperature, top_k, top_p), and the kept hidden states (or None).

        One tokenizer: a teacher-forced ``sampler.score`` pass. Another tokenizer: the teacher
        scores each response's text in its own tokenization after its own prompt
        (``teacher_prompts``), and each teacher token's log-prob is credited to the student token
        that completes its last character (``xtok.spread``); each row then sums to the teacher's
        log-prob of the row's text (EOS included when the student ended with one)."""
        from minidistill.generation.sampler import Rollout, score

        if teacher_prompts is None:
            with self.autocast():
                return score(self.model, ro, settings, keep_hidden=keep_hidden, chunk=chunk, vocab=self.vocab_size)
        B, T = ro.response_ids.shape
        lengths = ro.response_mask.sum(-1).tolist()
        views = [self.aligner.teacher_view(ro.response_ids[b, : int(n)].tolist()) for b, n in enumerate(lengths)]
        width = max(1, max(len(v.ids) for v in views))
        r_ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        r_mask = torch.zeros((B, width), dtype=torch.long)
        credit = torch.full((B, width), -1, dtype=torch.long)
        for b, v in enumerate(views):
            r_ids[b, : len(v.ids)] = torch.as_tensor(v.ids, dtype=torch.long)
            r_mask[b, : len(v.ids)] = 1
            credit[b, : len(v.ids)] = torch.as_tensor(v.credit, dtype=torch.long)
        p_ids, p_mask = data.collate_prompts(teacher_prompts, self.pad_id)
        zeros = torch.zeros((B, width))
        t_ro = Rollout(p_ids, p_mask, r_ids, r_mask, zeros, zeros, zeros)
        with self.autocast():
            logp, _ = score(self.model, t_ro, settings, keep_hidden=False, chunk=chunk, vocab=self.vocab_size)
        out = xtok.spread(logp.float().cpu(), credit, T)
        return out.where(ro.response_mask.bool().cpu(), torch.zeros(())).to(ro.response_ids.device), None

    # ---- (c) generated text ----------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], settings: dict, seed: int) -> list[list[int]]:
        """Sampled continuations of prompts in the teacher's tokens (new ids up to, not including, EOS)."""
        from minidistill.generation.evaluation import generate_ids

        return generate_ids(
            self.model,
            self.tokenizer,
            prompt_ids,
            max_new_tokens=settings["max_new_tokens"],
            batch_size=len(prompt_ids),
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            top_k=settings["top_k"],
            seed=seed,
            progress=False,
            vocab_size=self.vocab_size,
        )

    @property
    def dtype_name(self) -> str:
        return str(next(self.model.parameters()).dtype).replace("torch.", "")


@dataclass
class StoredTeacher:
    """PD's offline teacher: the top-p-k distributions a ``pd_store`` stage wrote for the training
    blocks (``logit_store.LogitStore``), indexed by block. It holds nothing else."""

    store: Any
    device: Any = "cpu"

    def target(self, input_ids, top_p: float, top_k: int | None, vocab: int, block_idx=None) -> Truncated:
        if block_idx is None:
            raise UserError(
                f"logit store {self.store.folder}: holds the training blocks only (asked for text it does not index)"
            )
        return self.store.truncated(block_idx, self.device)


# ---- loading and pairing ---------------------------------------------------------------------------


def as_teacher(teacher):
    """A ``Teacher`` (or ``StoredTeacher``) as it is; a bare transformers model as the local teacher
    with the student's tokenizer (what tests, benches and notebooks pass)."""
    if teacher is None or isinstance(teacher, (Teacher, StoredTeacher)):
        return teacher
    return Teacher(teacher, None, "teacher")


def load(run) -> Teacher:
    """The recipe's teacher, frozen, in fp32 (a pruned student is copied from full-precision
    weights); under FSDP on the CPU until ``build.shard_teacher`` moves each shard over."""
    r = run.recipe
    model, tok = named(
        "teacher.model",
        lambda: models.load_model(
            r.teacher.model,
            gguf_file=r.teacher.gguf_file,
            dtype="fp32",
            device="cpu" if run.fsdp else run.device,
            trust_remote_code=r.teacher.trust_remote_code,
        ),
    )
    return Teacher(models.freeze(model), tok, r.teacher.model, autocast=run.accelerator.autocast)


def check_stages(teacher: Teacher, student_tok, stages, student_name: str, stage_of) -> None:
    """Pair the teacher with the student's tokenizer for these stages, or refuse in one line.

    Each stage says what it asks of the teacher (``Stage.cross_tokenizer(cfg)`` -> (mode, problem):
    ``"token"`` = a cross-tokenizer loss over character spans, ``"text"`` = teacher-written text,
    ``""`` = nothing across tokenizers; ``problem``: why it cannot run with another tokenizer).
    Another tokenizer is allowed only when some stage asks for it and none has a problem. A
    cross-tokenizer loss with the same tokenizer gets the same alignment with it on both sides."""
    asks = [(cfg, *stage_of(cfg.type).cross_tokenizer(cfg)) for cfg in stages]
    if student_tok is None or student_tok.get_vocab() == teacher.tokenizer.get_vocab():
        if any(mode == "token" for _, mode, _ in asks):
            teacher.aligner = xtok.Aligner(
                teacher.tokenizer, teacher.tokenizer, f"teacher.model '{teacher.name}'", "student"
            )
        return
    base = f"tokenizer differs from the teacher's ({len(student_tok)} vs {len(teacher.tokenizer)} tokens)"
    problems = [f"stage '{cfg.name}' {problem}" for cfg, _, problem in asks if problem]
    if problems:
        raise UserError(f"student.model: {base}, so every stage must work across tokenizers: {problems[0]}")
    if not any(mode for _, mode, _ in asks):
        raise UserError(
            f"student.model: {base}; distillation needs the same tokenizer, or a cross-tokenizer setting: "
            "kd/seqkd kind: uld or uld_hybrid, pd kd_kind: uld or uld_hybrid, minillm cross_tokenizer: true "
            "(README, 'Cross-tokenizer distillation')"
        )
    teacher.aligner = xtok.Aligner(
        teacher.tokenizer, student_tok, f"teacher.model '{teacher.name}'", f"student.model '{student_name}'"
    )
    teacher.student_tokenizer = student_tok
