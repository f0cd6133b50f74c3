"""A teacher behind a server: the OpenAI-compatible completions API that vLLM serves
(``teacher: {model: <tokenizer folder or hub id>, server: http://host:port}`` in a recipe).

A teacher of 7-70B rarely fits beside the student; served, it runs on its own GPUs (or another
machine) and the trainer asks it for what stages need, through one endpoint, ``/v1/completions``
with ``max_tokens: 1`` and vLLM's ``prompt_logprobs: K``: for every position of a token sequence
the log-prob of the token that is there and the teacher's top K (raw log-softmax, temperature 1).

(a) MiniLLM rewards: the log-prob of each response token (one tokenizer: per token; another: the
    teacher scores its own tokenization of the text and ``xtok.spread`` credits it, as the local
    teacher does);
(b) distributions: the top K with the rest mass, the representation the offline PD store keeps
    (``losses.Truncated``): KD, SeqKD+KD, PD and L_PT run their truncated-teacher paths (fkl, tv,
    jsd with beta < 1, skew kinds with skew > 0; reverse KL and mse need the full distribution and
    are refused). MiniLLM's single-step term gets :func:`dense_logprobs`: the top K exact and the rest
    mass spread evenly over the other tokens (a top-K estimate of the per-position reverse KL;
    ``bench/served_vllm_bench.py`` measures its error against the exact term on a local teacher);
(c) text: ``/v1/completions`` sampling, token ids returned (``return_token_ids``).

What a server cannot give is refused before anything is written (:func:`check_stages`, asking each
stage's ``Stage.served_teacher``): teacher-mixed sampling (the teacher must run in lockstep with
the sampler), distributions at temperature/top-k/top-p other than 1/0/1, pd_store, the evaluate
stage's KL columns, a student pruned from or built on the teacher's weights. :meth:`Client.preflight`
checks, before training, that the server answers, serves the named model, returns prompt log-probs
with K alternatives, and tokenizes like the local tokenizer; each failure is one line (exit 2).

Requests carry ``request_rows`` sequences each and up to ``concurrency`` are in flight (threads);
MiniLLM submits each sampling batch's scoring as soon as it is sampled and samples the next batch
while the server scores (``response_logp_async``). A request that times out or fails with a
connection error or a 5xx is retried ``retries`` times with backoff; after that the run stops with
one line, its last checkpoint intact (``resume=auto`` continues once the server is back).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from minidistill.errors import UserError
from minidistill.functional import xtok
from minidistill.functional.losses import NEG_INF, Truncated
from minidistill.teacher import Teacher

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 1234 ünïcödé?"

# ---- pure parts: the server's answer as tensors -----------------------------------------------


def parse_prompt_logprobs(entries: list, ids: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence's ``prompt_logprobs`` (a list with ``None`` first, then per position a dict
    ``{token_id: {"logprob": ...}}`` holding the token that is there and the top ``k``) as
    (log p of ids[1:] (n-1,), alternatives' ids (n-1, k+1), their log-probs (n-1, k+1)); slots a
    position does not fill (the actual token already in the top k) are -inf with id 0."""
    n = len(ids)
    if not isinstance(entries, list) or len(entries) != n:
        raise ValueError(
            f"expected {n} prompt_logprobs entries, got {len(entries) if isinstance(entries, list) else entries!r}"
        )
    actual = torch.zeros(n - 1, dtype=torch.float32)
    idx = torch.zeros((n - 1, k + 1), dtype=torch.long)
    lp = torch.full((n - 1, k + 1), NEG_INF, dtype=torch.float32)
    for t in range(1, n):
        d = entries[t]
        if not d or str(ids[t]) not in d:
            raise ValueError(f"position {t}: no log-prob for the token there ({ids[t]})")
        actual[t - 1] = float(d[str(ids[t])]["logprob"])
        items = sorted(((int(tok), float(v["logprob"])) for tok, v in d.items()), key=lambda x: -x[1])[: k + 1]
        for j, (tok, val) in enumerate(items):
            idx[t - 1, j], lp[t - 1, j] = tok, val
    return actual, idx, lp


def topk_truncate(idx: torch.Tensor, lp: torch.Tensor, top_p: float, top_k: int) -> Truncated:
    """PD's top-p-k truncation (``logit_store.truncate_raw``: raw log-probs kept, not renormalised)
    applied to a served top-K (..., W): the same result as on the full distribution whenever
    ``top_k`` <= the served K. Width ``top_k``; unused slots id 0, -inf."""
    v, order = lp.float().sort(-1, descending=True)
    i = idx.gather(-1, order)
    k = min(top_k, v.shape[-1])
    v, i = v[..., :k], i[..., :k]
    keep = v > NEG_INF
    if top_p < 1:
        cum = v.exp().cumsum(-1)
        before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], -1)
        keep &= before < top_p
    v, i = v.masked_fill(~keep, NEG_INF), i.masked_fill(~keep, 0)
    if k < top_k:
        v = torch.nn.functional.pad(v, (0, top_k - k), value=NEG_INF)
        i = torch.nn.functional.pad(i, (0, top_k - k), value=0)
    return Truncated(i, v)


def dense_logprobs(idx: torch.Tensor, lp: torch.Tensor, vocab: int) -> torch.Tensor:
    """(..., vocab) log-probs from a top-K (..., W): exact on the kept ids, the rest mass
    1 - sum(kept) spread evenly over the other vocab - |kept| ids. A distribution (sums to 1);
    where the top K is the true one, no outside token gets more than the K-th kept token (the
    average of what is left cannot exceed its smallest kept probability). Rows with nothing kept
    are uniform."""
    lp = lp.float()
    kept = lp > NEG_INF
    n_kept = kept.sum(-1, keepdim=True)
    mass = torch.where(kept, lp.exp(), 0.0).sum(-1, keepdim=True).clamp(max=1.0)
    log_rest = torch.log((1.0 - mass).clamp(min=1e-12) / (vocab - n_kept).clamp(min=1))  # (..., 1)
    out = log_rest.expand(*lp.shape[:-1], vocab).clone()
    # unused slots write the best slot's (id, value) again, so no slot overwrites a kept id
    best = lp.argmax(-1, keepdim=True)
    ids = torch.where(kept, idx, idx.gather(-1, best))
    vals = torch.where(kept, lp, torch.where(kept.any(-1, keepdim=True), lp.gather(-1, best), log_rest))
    return out.scatter_(-1, ids, vals)


# ---- the wire: one client per run ---------------------------------------------------------------


@dataclass
class Client:
    """POSTs JSON to an OpenAI-compatible server, with timeouts, retries and a thread pool."""

    url: str
    model: str
    timeout_s: float = 120.0
    retries: int = 3
    concurrency: int = 4
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="teacher")
        return self._pool

    def request(self, path: str, body: dict | None = None) -> dict:
        """GET (``body`` None) or POST ``path``; retried on timeouts, connection errors and 5xx;
        a 4xx (the request itself is wrong) raises UserError at once with the server's message."""
        url = self.url.rstrip("/") + path
        payload = json.dumps(body).encode() if body is not None else None
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0**attempt, 30.0))
            req = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                msg = _server_message(e)
                if e.code < 500:
                    raise UserError(f"teacher.server {self.url}: {path} answered {e.code}: {msg}") from None
                last = f"{e.code}: {msg}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = " ".join(str(getattr(e, "reason", e)).split()) or type(e).__name__
        raise UserError(
            f"teacher.server {self.url}: no answer to {path} after {self.retries + 1} tries ({last}); "
            "start the server (README, 'Served teacher') and rerun with resume=auto"
        )

    def completions(self, body: dict) -> dict:
        return self.request("/v1/completions", {"model": self.model, **body})

    def prompt_logprobs(self, seqs: list[list[int]], k: int) -> list:
        """The ``prompt_logprobs`` list of each sequence (one request)."""
        out = self.completions({"prompt": seqs, "max_tokens": 1, "prompt_logprobs": k, "temperature": 0.0})
        choices = sorted(out.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(seqs) or any(c.get("prompt_logprobs") is None for c in choices):
            raise UserError(
                f"teacher.server {self.url}: the answer has no prompt_logprobs for every sequence; the trainer "
                "needs vLLM's prompt_logprobs (README, 'Served teacher')"
            )
        return [c["prompt_logprobs"] for c in choices]

    def preflight(self, tokenizer, k: int, name: str) -> int | None:
        """Check the server before training: it answers, serves ``model``, returns ``k``
        alternatives per position and tokenizes ``PROBE_TEXT`` like ``tokenizer``. Returns the
        served model's max_model_len (or None)."""
        models = self.request("/v1/models").get("data", [])
        ids = [m.get("id") for m in models]
        if self.model not in ids:
            raise UserError(
                f"teacher.served_model: the server at {self.url} serves {ids}, not '{self.model}' "
                "(set teacher.served_model to the name given to --served-model-name)"
            )
        max_len = next((m.get("max_model_len") for m in models if m.get("id") == self.model), None)
        try:
            probe = self.completions(
                {
                    "prompt": PROBE_TEXT,
                    "max_tokens": 1,
                    "prompt_logprobs": k,
                    "temperature": 0.0,
                    "return_token_ids": True,
                }
            )
        except UserError as e:
            raise UserError(
                f"{e} (teacher.logprobs: {k} alternatives per position need the server started with "
                f"--max-logprobs {k} or -1)"
            ) from None
        choice = probe["choices"][0]
        entries = choice.get("prompt_logprobs")
        if not entries or len(entries) < 2:
            raise UserError(
                f"teacher.server {self.url}: no prompt_logprobs in the answer; the trainer needs vLLM's prompt_logprobs"
            )
        server_ids = choice.get("prompt_token_ids")
        if server_ids is None:  # not returned: with 0 alternatives, the one key at a position is the token there
            plain = self.completions({"prompt": PROBE_TEXT, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0})
            server_ids = [None] + [int(next(iter(d))) for d in plain["choices"][0]["prompt_logprobs"][1:]]
        local = tokenizer(PROBE_TEXT)["input_ids"]
        if list(server_ids[1:]) != list(local[1:]) or len(server_ids) != len(local):
            raise UserError(
                f"teacher.model '{name}': its tokenizer does not match the served model's "
                f"(the probe text is {len(local)} tokens here, {len(server_ids)} on the server, first difference at "
                f"token {next((i for i, (a, b) in enumerate(zip(local, server_ids)) if a != b), min(len(local), len(server_ids)))}); "
                "teacher.model must name the served model's tokenizer"
            )
        widest = max(len(d) for d in entries[1:] if d)
        if widest < min(k, len(tokenizer)):
            raise UserError(
                f"teacher.server {self.url}: asked for {k} log-probs per position, got {widest}; "
                f"start the server with --max-logprobs {k} (or -1)"
            )
        return max_len


def _server_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
        err = body.get("error", body)
        return " ".join(str(err.get("message", err) if isinstance(err, dict) else err).split())[:300]
    except Exception:  # noqa: BLE001 - any unreadable body: the status line says enough
        return e.reason or ""


# ---- the teacher -----------------------------------------------------------------------------------


@dataclass
class ServedTeacher(Teacher):
    """A teacher behind ``client``: the local ``tokenizer`` is the served model's (checked by
    :meth:`Client.preflight`). Everything that would read ``model`` is answered by the server or
    refused (``lockstep``, ``block_logits``, ``pair_logits``)."""

    client: Client | None = None
    logprobs: int = 20  # K alternatives per position
    request_rows: int = 8  # sequences per request

    # ---- what this teacher is ------------------------------------------------------------------
    served = True

    def lockstep(self):
        """None: the sampler runs the student alone (a = 0); teacher-mixed sampling was refused by
        :func:`check_stages`, since the teacher cannot run in lockstep with the sampler."""
        return None

    def check_vocab(self, student, student_vocab: int) -> int:
        """The usable vocabulary: the tokenizer's (the student's head must cover it)."""
        from minidistill import models

        if self.aligner is None:
            self.vocab_size = models.check_vocab(student, student, self.tokenizer, where="student (served teacher)")
            return self.vocab_size
        self.vocab_size = len(self.tokenizer)
        self.aligner.shared(student_vocab, self.vocab_size)
        return student_vocab

    @property
    def dtype_name(self) -> str:
        return "served"

    # ---- scoring sequences ----------------------------------------------------------------------
    def score_async(self, seqs: list[list[int]], k: int | None = None) -> Future:
        """A future of ``[(actual (n-1,), idx (n-1, k+1), lp (n-1, k+1))]`` per sequence, requested
        ``request_rows`` sequences at a time, the requests in flight together."""
        k = self.logprobs if k is None else k
        parts = [
            self.client.pool.submit(self.client.prompt_logprobs, seqs[i : i + self.request_rows], k)
            for i in range(0, len(seqs), self.request_rows)
        ]
        done: Future = Future()

        def finish():
            try:
                entries = [e for f in parts for e in f.result()]
                done.set_result([parse_prompt_logprobs(e, s, k) for e, s in zip(entries, seqs, strict=True)])
            except ValueError as e:
                done.set_exception(UserError(f"teacher.server {self.client.url}: unexpected prompt_logprobs ({e})"))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                done.set_exception(e)

        # resolve on a plain thread: waiting inside the pool could starve it
        threading.Thread(target=finish, daemon=True).start()
        return done

    def score(self, seqs: list[list[int]], k: int | None = None) -> list:
        return self.score_async(seqs, k).result()

    # ---- (b) distributions at the student's positions ------------------------------------------
    def logits(self, input_ids, attention_mask=None, vocab: int | None = None) -> Truncated:
        """The served top-K at every next-token position (B, L-1, K+1) of each row's tokens (the
        positions where ``attention_mask`` is 1, a contiguous run), as ``Truncated``; positions
        outside that run hold a one-slot placeholder (masked out by the callers)."""
        self._refuse_cross("a distribution at the student's positions")
        B, L = input_ids.shape
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        rows, starts = [], []
        for b in range(B):
            pos = mask[b].nonzero().flatten().tolist()
            start, stop = (pos[0], pos[-1] + 1) if pos else (0, 1)
            rows.append(input_ids[b, start:stop].tolist())
            starts.append(start)
        k = self.logprobs
        idx = torch.zeros((B, L - 1, k + 1), dtype=torch.long)
        lp = torch.full((B, L - 1, k + 1), NEG_INF, dtype=torch.float32)
        lp[..., 0] = 0.0
        scorable = [b for b, r in enumerate(rows) if len(r) >= 2]
        for b, (_, i, v) in zip(scorable, self.score([rows[b] for b in scorable])):
            s = starts[b]
            idx[b, s : s + len(i)], lp[b, s : s + len(i)] = i, v
        dev = input_ids.device
        return Truncated(idx.to(dev), lp.to(dev))

    def block_logits(self, input_ids, vocab: int):
        raise UserError(
            f"teacher.server: pd_store keeps the teacher's distribution at every position of a block, which the "
            f"served teacher '{self.name}' does not give; use pd with teacher_logits: online (the server's top-k)"
        )

    def target(self, input_ids, top_p: float, top_k: int | None, vocab: int, block_idx=None) -> Truncated:
        """PD's target: the top-p-k truncation of the served top-K (``topk_truncate``)."""
        if not top_k or top_k > self.logprobs:
            raise UserError(
                f"teacher.logprobs: pd top_k {top_k} needs the server's top {top_k} (teacher.logprobs: {self.logprobs}); "
                "a served teacher gives no full distribution"
            )
        t = self.logits(input_ids, vocab=vocab)
        return topk_truncate(t.indices, t.logprobs, top_p, top_k)

    def response_logits(self, batch: dict, vocab: int) -> torch.Tensor:
        """(B, T, V) log-probs predicting each response token for MiniLLM's single-step term, from
        the top K the collection stored with the rollout (``dense_logprobs``: rest mass spread)."""
        if batch.get("teacher_topk_ids") is None:
            raise UserError(
                "teacher.server: this rollout buffer holds no teacher top-k (collected by another teacher?)"
            )
        return dense_logprobs(batch["teacher_topk_ids"], batch["teacher_topk_logp"], vocab)

    def pair_logits(self, side: dict):
        raise UserError(
            f"teacher.server: a cross-tokenizer loss over paired positions (uld kinds) needs the full distribution, "
            f"which the served teacher '{self.name}' does not give"
        )

    # ---- (a) per-token log-probs of responses --------------------------------------------------
    def response_logp_async(self, ro, settings, *, teacher_prompts=None, keep_topk: bool = False) -> Future:
        """A future of (log p(y_t) (B, T), top-K ids (B, T, K+1) or None, their log-probs or None)
        for a rollout's responses (one tokenizer: per token; another: the teacher scores its own
        tokens of the text after ``teacher_prompts``, credited by ``xtok.spread``)."""
        if tuple(settings) != (1.0, 0, 1.0):
            raise UserError(
                f"teacher.server: scoring at temperature/top_k/top_p {tuple(settings)} needs the processed teacher "
                "distribution; a server returns the raw one (use temperature 1, top_k 0, top_p 1)"
            )
        B, T = ro.response_ids.shape
        lengths = [int(n) for n in ro.response_mask.sum(-1).tolist()]
        if teacher_prompts is None:
            prompts = [ro.prompt_ids[b][ro.prompt_mask[b].bool()].tolist() for b in range(B)]
            resp = [ro.response_ids[b, : lengths[b]].tolist() for b in range(B)]
            credit = None
        else:
            prompts = teacher_prompts
            views = [self.aligner.teacher_view(ro.response_ids[b, : lengths[b]].tolist()) for b in range(B)]
            resp = [v.ids for v in views]
            credit = views
        fut = self.score_async([p + r for p, r in zip(prompts, resp, strict=True)])
        out: Future = Future()
        k = self.logprobs

        def assemble(f: Future):
            try:
                scored = f.result()
                width = max(1, max(len(r) for r in resp))
                logp = torch.zeros((B, width))
                ids = torch.zeros((B, width, k + 1), dtype=torch.long) if keep_topk else None
                lps = torch.full((B, width, k + 1), NEG_INF) if keep_topk else None
                for b, ((a, i, v), p, r) in enumerate(zip(scored, prompts, resp)):
                    s = len(p) - 1  # position len(p)-1 predicts the first response token
                    logp[b, : len(r)] = a[s : s + len(r)]
                    if keep_topk:
                        ids[b, : len(r)], lps[b, : len(r)] = i[s : s + len(r)], v[s : s + len(r)]
                if credit is not None:
                    c = torch.full((B, width), -1, dtype=torch.long)
                    for b, v in enumerate(credit):
                        c[b, : len(v.ids)] = torch.as_tensor(v.credit, dtype=torch.long)
                    logp = xtok.spread(logp, c, T)
                else:
                    logp = torch.nn.functional.pad(logp, (0, max(0, T - width)))[:, :T]
                    if keep_topk:
                        ids = torch.nn.functional.pad(ids, (0, 0, 0, max(0, T - width)))[:, :T]
                        lps = torch.nn.functional.pad(lps, (0, 0, 0, max(0, T - width)), value=NEG_INF)[:, :T]
                dev = ro.response_ids.device
                logp = logp.where(ro.response_mask.bool().cpu(), torch.zeros(())).to(dev)
                out.set_result((logp, ids.to(dev) if keep_topk else None, lps.to(dev) if keep_topk else None))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                out.set_exception(e)

        fut.add_done_callback(assemble)
        return out

    def response_logp(self, ro, settings, *, chunk: int, teacher_prompts=None, keep_hidden: bool = False):
        """As :meth:`Teacher.response_logp` (no hidden states: the top K goes on the rollout instead)."""
        logp, _, _ = self.response_logp_async(ro, settings, teacher_prompts=teacher_prompts).result()
        return logp, None

    # ---- (c) generated text ----------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], settings: dict, seed: int) -> list[list[int]]:
        """Sampled continuations (new ids up to, not including, EOS), from the server."""
        eos = self.tokenizer.eos_token_id
        body = {
            "max_tokens": settings["max_new_tokens"],
            "temperature": settings["temperature"],
            "top_p": settings["top_p"],
            "top_k": settings["top_k"] if settings["top_k"] else -1,
            "return_token_ids": True,
        }
        futures = [
            self.client.pool.submit(self.client.completions, {**body, "prompt": [p], "seed": seed + i})
            for i, p in enumerate(prompt_ids)
        ]
        out = []
        for f in futures:
            c = f.result()["choices"][0]
            ids = c.get("token_ids")
            if ids is None:  # a server without return_token_ids: the text, tokenized here
                ids = self.tokenizer(c["text"], add_special_tokens=False)["input_ids"]
            ids = list(ids)
            out.append(ids[: ids.index(eos)] if eos in ids else ids)
        return out


def load(run) -> ServedTeacher:
    """The recipe's served teacher: the tokenizer from ``teacher.model``, the server checked
    (:meth:`Client.preflight`) before anything is written."""
    from minidistill import models
    from minidistill.errors import named

    t = run.recipe.teacher
    tok = named("teacher.model", lambda: models.load_tokenizer(t.model, t.gguf_file, t.trust_remote_code))
    client = Client(t.server, t.served_model or t.model, t.timeout_s, t.retries, t.concurrency)
    client.preflight(tok, t.logprobs, t.model)
    return ServedTeacher(
        None,
        tok,
        t.model,
        client=client,
        logprobs=t.logprobs,
        request_rows=t.request_rows,
        autocast=run.accelerator.autocast,
    )


def truncated_problem(kind: str, skew: float, beta: float) -> str:
    """Why divergence ``kind`` cannot compare the student with a top-k teacher ('' when it can)."""
    if kind in ("uld", "uld_hybrid"):
        return f"kind '{kind}' compares full distributions across tokenizers; a served teacher gives its top-k"
    if kind == "mse" or kind == "rkl" or (kind == "jsd" and beta == 1) or (kind == "skew_rkl" and skew == 0):
        return (
            f"kind '{kind}' needs the full teacher distribution (reverse KL is +inf against a top-k one, mse needs "
            "raw logits); use fkl, skew_fkl, skew_rkl with skew > 0, jsd with beta < 1, tv or ce"
        )
    return ""


def check_stages(stages, stage_of, logprobs: int) -> None:
    """Refuse, in one line, a stage that asks a served teacher for what it cannot give
    (``Stage.served_teacher(cfg, logprobs)`` -> the problem, '' when none)."""
    for cfg in stages:
        problem = stage_of(cfg.type).served_teacher(cfg, logprobs)
        if problem:
            raise UserError(f"stage '{cfg.name}' with a served teacher (teacher.server): {problem}")
