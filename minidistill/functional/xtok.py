"""Cross-tokenizer distillation: character spans, span alignment, a shared-vocabulary map, the
ULD and hybrid losses, and MiniLLM's span-spread sequence reward.

Teacher p and student q have different tokenizers. Everything here works on one *text* that
both models see, each through its own tokenization; ids of one model never enter the other.

Character spans
---------------
Every vocabulary id gets the bytes it adds to the decoded text (:class:`TokenText`): byte-level
BPE (GPT-2, SmolLM2, Llama 3, Qwen) maps its symbols back through the byte alphabet;
SentencePiece-style tokenizers (Llama 2, Gemma) turn the space marker into a space and byte-
fallback tokens ``<0xNN>`` into their byte; any other tokenizer falls back to decoding each id
alone. Special tokens add nothing, except EOS, which counts as one virtual character (so EOS
aligns with EOS). A sequence's spans come from feeding those bytes through an incremental UTF-8
decoder: a token ends where the decoded text ends after it, so a token holding only part of a
character (byte fallback, byte-level BPE) has zero width and the token that completes the
character covers it. Spans are character offsets of the decoded text. A tokenizer whose tokens do
not spell a probe text back exactly (no per-token decode, no byte fallback: characters outside
its vocabulary become ``<unk>``) is refused with one error naming the model
(:func:`check_alignable`); at run time the teacher's tokenization of every text is checked the
same way.

Alignment
---------
The teacher sees its own tokenization of the same characters (:meth:`Aligner.teacher_view`:
the student's tokens are decoded, cut at EOS, each piece encoded by the teacher, its EOS put
back). A student position and a teacher position are *paired* when the tokens they predict start
at the same character, i.e. both predictions are conditioned on exactly the same text (the first
token of each side starting there; specials other than EOS never pair). These are the common
boundaries at which ULD/GOLD close their alignment groups; one pair per group, the group's first
position on each side. Student tokens that start inside a teacher token get no divergence term:
no teacher distribution is conditioned on that prefix, and merging distributions inside a group
(GOLD's "observed"/"bayesian" products) yields unnormalised vectors over continuations of
different lengths. They still get the CE / LM term. Divergence terms are averaged over pairs.

Shared vocabulary
-----------------
Two ids are the same token when they add the same bytes (this normalises the space markers:
``Ġthe`` and ``▁the`` are both b" the"); byte strings held by more than one id on a side stay
unshared; the two EOS ids are shared. :class:`SharedVocab` holds the matched id pairs.

Losses (tensor in, tensor out; student first as in ``losses``)
--------------------------------------------------------------
* :func:`uld`: Universal Logit Distillation, the sorted-probability Wasserstein-1 distance
  sum_r |p_(r) - q_(r)| (each side sorted descending, the shorter vocabulary padded with zeros;
  the sorted matching is the cheapest of all bijections between the two vocabularies).
  ``top_k`` > 0 compares the k largest probabilities of each side and the remaining masses as one
  more entry: exact when either side has no mass outside its top k (a truncated PD target), a
  lower bound otherwise, off by at most 2 min(P_rest, Q_rest) (cheap on 262k-token vocabularies).
* :func:`hybrid`: GOLD's hybrid. Exact forward KL between the two distributions restricted to the
  shared tokens (each renormalised there; 0 where the teacher has no shared mass) plus ULD over
  the unshared tokens' probabilities (sub-probabilities, not renormalised, so it also charges the
  difference in unshared mass), with weights. With identical vocabularies it is exactly forward
  KL. (Why renormalised: a KL over "shared tokens + one bucket for the rest" is a proper KL, but it
  pulls student mass onto whatever tokens are unshared, e.g. special tokens, to match the mass the
  teacher puts on its multi-character tokens.)

MiniLLM's reward across tokenizers
----------------------------------
r_t = log p(y_t) - log q(y_t) needs the teacher's log-probability of the student's tokens, which
the teacher cannot give token by token. The teacher scores the student's *text* in its own
tokenization (teacher forcing; the sum is the sequence-level log p of the same characters under
the teacher's canonical tokenization), and each teacher token's log-prob goes to the student token
that completes the teacher token's last character (:meth:`TeacherView.credit`,
:func:`spread`); zero-width teacher tokens (partial characters) go with the token that completes
their character. So the student token at which a piece of text is complete is credited with it:
the credit never lands before the text exists, every student token's reward is log p of the
characters it completes minus its own log q, and the rewards of a response sum exactly to
log p(text) - log q(y). Splitting a teacher token's log-prob over the student tokens it covers in
proportion to their characters would credit tokens before the teacher token is complete. The
single-step term (an exact KL over one vocabulary at every position) and teacher-mixed sampling
(drawing each token from a p + (1-a) q needs p and q over the same tokens at every step) have no
cross-tokenizer form and are refused.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from minidistill.errors import UserError

ULD_KINDS = ("uld", "uld_hybrid")
PROBES = ("Hello, world! It's 3:45 pm.\n\tTabs, new lines,  double  spaces.", "héllo ü ß ñ, 数学, Ελλάδα, 🙂 ok")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ---------------------------------------------------------------- per-token bytes


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_types(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    dec = json.loads(backend.to_str()).get("decoder") or {}
    found, todo = set(), [dec]
    while todo:
        d = todo.pop()
        if isinstance(d, dict):
            if "type" in d:
                found.add(d["type"])
            todo.extend(d.get("decoders") or [])
    return found


def vocab_bytes(tokenizer) -> tuple[list[bytes | None], str]:
    """(bytes per id, how they were read): what each id adds to the decoded text; None for
    special tokens (they add nothing). Modes: 'byte-level', 'sentencepiece', 'decode'."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    types = _decoder_types(tokenizer)
    if "ByteLevel" in types:
        mode, bd = "byte-level", _byte_decoder()
    elif types & {"Metaspace", "ByteFallback", "Replace"}:
        mode, fallback = "sentencepiece", "ByteFallback" in types
    else:
        mode = "decode"
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif mode == "byte-level":
            try:
                out.append(bytes(bd[c] for c in piece))
            except KeyError:  # an added plain-text token
                out.append(piece.encode())
        elif mode == "sentencepiece":
            m = _BYTE_TOKEN.fullmatch(piece) if fallback else None
            out.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode())
        else:
            out.append(tokenizer.decode([i], clean_up_tokenization_spaces=False).encode())
    return out, mode


@dataclass
class Spans:
    """Character spans of a token sequence: token k covers characters [starts[k], ends[k]) of the
    decoded text (EOS: one virtual character); ``text`` the pieces between EOS tokens."""

    starts: list[int]
    ends: list[int]
    pairable: list[bool]  # not a special token (EOS is pairable)
    pieces: list[str]  # decoded text between EOS tokens, in order
    eos_after: list[bool]  # pieces[i] is followed by an EOS token


class TokenText:
    """One tokenizer's view of text: per-id bytes, spans of id sequences, encoding."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer, self.name = tokenizer, name
        try:
            self.bytes, self.mode = vocab_bytes(tokenizer)
        except Exception as e:  # noqa: BLE001 - any tokenizer that cannot say what its tokens spell
            raise UserError(
                f"{name}: its tokenizer cannot be aligned with another tokenizer: no per-token decode "
                f"({type(e).__name__}: {' '.join(str(e).split())[:120]})"
            ) from None
        self.eos = getattr(tokenizer, "eos_token_id", None)
        if self.eos is None:
            raise UserError(f"{name}: its tokenizer has no eos_token, which cross-tokenizer alignment needs")
        self.eos = int(self.eos)

    def spans(self, ids: list[int]) -> Spans:
        """Character spans of ``ids`` (incremental UTF-8 decoding of the tokens' bytes)."""
        starts, ends, pairable, pieces, eos_after = [], [], [], [], []
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        pos, piece = 0, []
        nb = len(self.bytes)
        for t in ids:
            t = int(t)
            b = self.bytes[t] if 0 <= t < nb else None
            start = pos
            if t == self.eos:
                tail = dec.decode(b"", final=True)
                piece.append(tail)
                pieces.append("".join(piece))
                eos_after.append(True)
                piece, dec = [], codecs.getincrementaldecoder("utf-8")("replace")
                pos += len(tail) + 1
                starts.append(start)
                ends.append(pos)
                pairable.append(True)
                continue
            out = dec.decode(b) if b else ""
            piece.append(out)
            pos += len(out)
            starts.append(start)
            ends.append(pos)
            pairable.append(b is not None)
        tail = dec.decode(b"", final=True)
        if tail:
            piece.append(tail)
            pos += len(tail)
            if ends:
                ends[-1] = pos
        pieces.append("".join(piece))
        eos_after.append(False)
        return Spans(starts, ends, pairable, pieces, eos_after)

    def encode(self, text: str) -> tuple[list[int], int]:
        """(ids, shift): the tokenizer's ids for ``text`` (no special tokens) and the number of
        leading characters its tokens add that ``text`` does not have (a SentencePiece dummy-prefix
        space: 1, else 0). Refused when the tokens do not spell ``text`` back."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not text:
            return ids, 0
        back = self.spans(ids).pieces[0] if ids else ""
        if back == text:
            return ids, 0
        if back == " " + text:
            return ids, 1
        unk = getattr(self.tokenizer, "unk_token_id", None)
        why = " (characters outside its vocabulary become <unk>: it has no byte fallback)" if unk in ids else ""
        raise UserError(
            f"{self.name}: its tokenizer cannot be aligned with another tokenizer: its tokens do not spell the text "
            f"back exactly ({_clip(text)!r} comes back as {_clip(back)!r}){why}"
        )


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[:n] + "..."


def check_alignable(tt: TokenText) -> None:
    """Refuse a tokenizer that cannot give character spans (see the module docstring)."""
    for probe in PROBES:
        tt.encode(probe)


# ---------------------------------------------------------------- shared vocabulary


@dataclass
class SharedVocab:
    """Matched token ids: ``student[k]`` and ``teacher[k]`` add the same bytes (or are both EOS)."""

    student: Tensor  # (S,) long
    teacher: Tensor  # (S,) long

    def __len__(self) -> int:
        return int(self.student.numel())

    def to(self, device) -> SharedVocab:
        return SharedVocab(self.student.to(device), self.teacher.to(device))


def shared_vocab(student: TokenText, teacher: TokenText, vs: int | None = None, vt: int | None = None) -> SharedVocab:
    """Ids (below ``vs`` / ``vt``) whose bytes are equal on both sides and unique on each, plus EOS."""

    def unique(tb: list[bytes | None], limit: int | None) -> dict[bytes, int]:
        seen: dict[bytes, int] = {}
        dup: set[bytes] = set()
        for i, b in enumerate(tb[:limit]):
            if not b:
                continue
            if b in seen:
                dup.add(b)
            else:
                seen[b] = i
        return {b: i for b, i in seen.items() if b not in dup}

    s, t = unique(student.bytes, vs), unique(teacher.bytes, vt)
    pairs = sorted((t[b], s[b]) for b in s.keys() & t.keys())
    pairs.append((teacher.eos, student.eos))
    return SharedVocab(
        torch.tensor([p[1] for p in pairs], dtype=torch.long), torch.tensor([p[0] for p in pairs], dtype=torch.long)
    )


# ---------------------------------------------------------------- alignment


def pairs(s: Spans, t: Spans) -> tuple[list[int], list[int]]:
    """Indices (i, j) of student and teacher tokens that start at the same character: for each
    character both sides start a pairable token at, the first such token of each side."""
    first_t: dict[int, int] = {}
    for j, (a, ok) in enumerate(zip(t.starts, t.pairable)):
        if ok and a not in first_t:
            first_t[a] = j
    si, ti, seen = [], [], set()
    for i, (a, ok) in enumerate(zip(s.starts, s.pairable)):
        if ok and a not in seen and a in first_t:
            seen.add(a)
            si.append(i)
            ti.append(first_t[a])
    return si, ti


def credit(s: Spans, t: Spans) -> list[int]:
    """For each teacher token, the student token credited with its log-prob: the one that
    completes the teacher token's last character; a zero-width teacher token goes with the next
    teacher token that completes a character (trailing ones, and any beyond the student's text,
    with the last student token)."""
    n_s = len(s.ends)
    if n_s == 0:
        return [-1] * len(t.ends)
    out: list[int] = [0] * len(t.ends)
    import bisect

    pending: list[int] = []
    for j, (a, b) in enumerate(zip(t.starts, t.ends)):
        pending.append(j)
        if b > a:
            i = min(bisect.bisect_right(s.ends, b - 1), n_s - 1)  # first student token with end > b - 1
            for k in pending:
                out[k] = i
            pending = []
    for k in pending:
        out[k] = n_s - 1
    return out


@dataclass
class TeacherView:
    """The teacher's tokenization of the text of a student token sequence."""

    ids: list[int]  # teacher ids (no BOS/prompt: the caller prepends its own)
    student_pairs: list[int]  # paired student token indices (into the student sequence)
    teacher_pairs: list[int]  # the teacher token index paired with each
    credit: list[int]  # per teacher token: the student token its log-prob is credited to


class Aligner:
    """Both tokenizers of a cross-tokenizer run: checks that each can give spans, maps text."""

    def __init__(self, teacher_tok, student_tok, teacher_name: str = "teacher", student_name: str = "student"):
        self.teacher = TokenText(teacher_tok, teacher_name)
        self.student = TokenText(student_tok, student_name)
        check_alignable(self.teacher)
        check_alignable(self.student)
        self._shared: SharedVocab | None = None

    def shared(self, vs: int | None = None, vt: int | None = None) -> SharedVocab:
        """The shared-vocabulary map over the first ``vs`` student / ``vt`` teacher ids, built on
        the first call; a later call may omit the limits but not change them."""
        if self._shared is None:
            self._shared = shared_vocab(self.student, self.teacher, vs, vt)
            self._limits = (vs, vt)
        elif (vs, vt) != (None, None) and (vs, vt) != self._limits:
            raise ValueError(f"shared vocabulary already built for limits {self._limits}, asked for {(vs, vt)}")
        return self._shared

    def teacher_view(self, student_ids: list[int]) -> TeacherView:
        """The teacher's ids for the text of ``student_ids`` (pieces between EOS encoded one by
        one, the teacher's EOS where the student has one), the pairs and the credit map."""
        s = self.student.spans(student_ids)
        ids, starts, ends, pairable = [], [], [], []
        pos = 0
        for piece, eos in zip(s.pieces, s.eos_after):
            if piece:
                t_ids, shift = self.teacher.encode(piece)
                sp = self.teacher.spans(t_ids)
                ids += t_ids
                starts += [pos + max(a - shift, 0) for a in sp.starts]
                ends += [pos + max(b - shift, 0) for b in sp.ends]
                pairable += sp.pairable
                pos += len(piece)
            if eos:
                ids.append(self.teacher.eos)
                starts.append(pos)
                ends.append(pos + 1)
                pairable.append(True)
                pos += 1
        t = Spans(starts, ends, pairable, s.pieces, s.eos_after)
        si, ti = pairs(s, t)
        return TeacherView(ids, si, ti, credit(s, t))


# ---------------------------------------------------------------- losses


def sorted_l1(p: Tensor, q: Tensor, top_k: int = 0) -> Tensor:
    """sum_r |p_(r) - q_(r)| of (sub-)probability rows sorted descending, the narrower side padded
    with zeros; (N, Vp), (N, Vq) -> (N,). ``top_k`` > 0: the k largest of each side plus the
    remaining masses as one entry (exact when a side has at most k non-zero entries)."""
    if top_k and top_k < max(p.shape[-1], q.shape[-1]):
        ps = p.topk(min(top_k, p.shape[-1]), dim=-1).values
        qs = q.topk(min(top_k, q.shape[-1]), dim=-1).values
        rest = (p.sum(-1) - ps.sum(-1)) - (q.sum(-1) - qs.sum(-1))
        head = _pad_l1(ps, qs)
        return head + rest.abs()
    ps = p.sort(dim=-1, descending=True).values
    qs = q.sort(dim=-1, descending=True).values
    return _pad_l1(ps, qs)


def _pad_l1(ps: Tensor, qs: Tensor) -> Tensor:
    w = max(ps.shape[-1], qs.shape[-1])
    ps = F.pad(ps, (0, w - ps.shape[-1]))
    qs = F.pad(qs, (0, w - qs.shape[-1]))
    return (ps - qs).abs().sum(-1)


def uld(student_logp: Tensor, teacher_logp: Tensor, top_k: int = 0) -> Tensor:
    """ULD: sorted-probability Wasserstein-1 between q (N, Vs) and p (N, Vt) log-probs; (N,)."""
    return sorted_l1(teacher_logp.exp(), student_logp.exp(), top_k)


def hybrid(
    student_logp: Tensor,
    teacher_logp: Tensor,
    shared: SharedVocab,
    top_k: int = 0,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
) -> Tensor:
    """matched_weight * KL(p|shared || q|shared) + unmatched_weight * ULD(p, q on unshared tokens).

    p|shared, q|shared: the distributions restricted to the shared ids and renormalised there
    (the matched KL is 0 at rows where the teacher has no mass on shared tokens). The ULD part
    compares the unshared tokens' probabilities as they are (sub-probabilities). (N,)"""
    lp_a = teacher_logp[:, shared.teacher]  # (N, S)
    lq_a = student_logp[:, shared.student]  # (N, S)
    lp_n = lp_a - lp_a.logsumexp(-1, keepdim=True)
    lq_n = lq_a - lq_a.logsumexp(-1, keepdim=True)
    p_n = lp_n.exp()
    kl = (p_n * torch.where(p_n > 0, lp_n - lq_n, 0.0)).sum(-1)
    kl = torch.where(torch.isfinite(lp_a.logsumexp(-1)), kl, torch.zeros_like(kl))
    p = teacher_logp.exp().index_fill(-1, shared.teacher, 0.0)
    q = student_logp.exp().index_fill(-1, shared.student, 0.0)
    return matched_weight * kl + unmatched_weight * sorted_l1(p, q, top_k)


def divergence_sum(
    student_rows: Tensor,
    teacher_rows,
    kind: str,
    *,
    shared: SharedVocab | None = None,
    temperature: float = 1.0,
    student_temperature: bool = False,
    top_k: int = 0,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
    chunk_size: int = 64,
) -> Tensor:
    """Sum over paired positions of ``kind`` (uld | uld_hybrid): ``student_rows`` (M, Vs) logits
    (with grad), ``teacher_rows`` (M, Vt) teacher logits (or log-probs, e.g. a truncated target
    with -inf outside its kept set), or a callable ``(start, stop) -> (n, Vt)`` that makes them a
    chunk at a time (a 262k-token teacher vocabulary). float32, ``chunk_size`` rows at a time.
    The teacher is tempered (/tau); with ``student_temperature`` the student too and the sum is
    scaled by tau**2."""
    if kind not in ULD_KINDS:
        raise ValueError(f"unknown cross-tokenizer kind {kind!r}; expected one of {ULD_KINDS}")
    if kind == "uld_hybrid" and shared is None:
        raise ValueError("kind 'uld_hybrid' needs the shared vocabulary")
    M = student_rows.shape[0]
    tau = float(temperature)
    total = student_rows.float().sum() * 0.0  # connected to the graph even with no pair
    for a, chunk in zip(range(0, M, chunk_size), student_rows.split(chunk_size)):
        t = teacher_rows(a, a + chunk.shape[0]) if callable(teacher_rows) else teacher_rows[a : a + chunk.shape[0]]
        t = t.detach().float()
        s = chunk.float()
        if tau != 1:
            t = t / tau
            if student_temperature:
                s = s / tau
        lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
        if kind == "uld":
            d = uld(lq, lp, top_k)
        else:
            d = hybrid(lq, lp, shared.to(lq.device), top_k, matched_weight, unmatched_weight)
        total = total + d.sum()
    if student_temperature and tau != 1:
        total = total * tau**2
    return total


def spread(teacher_logp: Tensor, credit_idx: Tensor, n_student: int) -> Tensor:
    """Per-student-token sums of teacher token log-probs: (B, Tt) log-probs and (B, Tt) credit
    indices (-1 = padding) -> (B, n_student); each row sums to its teacher log-probs' sum."""
    B = teacher_logp.shape[0]
    out = torch.zeros((B, n_student), dtype=teacher_logp.dtype, device=teacher_logp.device)
    valid = credit_idx >= 0
    idx = credit_idx.clamp(min=0).to(teacher_logp.device)
    return out.scatter_add(1, idx, torch.where(valid.to(teacher_logp.device), teacher_logp, 0.0))
