"""The vLLM side of the rollout engine (``vllm_engine.py``): run by the vLLM environment's Python
(``.venv-vllm``, tools/setup-vllm.sh) as a script, so it imports vLLM and torch only, never
minidistill (whose transformers pin vLLM's excludes).

    .venv-vllm/bin/python vllm_worker.py HOST PORT AUTHKEY_HEX

It connects back to the trainer (``multiprocessing.connection``) and answers requests, each a dict
with ``op``; every answer is ``{"ok": True, ...}`` or ``{"ok": False, "error": "..."}``:

- ``init``: an in-process ``vllm.LLM`` over the student folder the trainer exported;
- ``generate``: sampled continuations of token-id prompts (per-row seeds), with finish reasons;
- ``sync``: reload the weights from the folder (the trainer rewrote its safetensors), then run the
  LM head's weight post-processing again (on CPU the head keeps a prepacked copy of the tied
  embedding that ``reload_weights`` does not refresh: without this, log-probs stay those of the old
  head, up to ~1 nat off) and drop the prefix cache;
- ``logprobs``: the log-prob of each token of some sequences given its prefix (the sync check);
- ``close``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from multiprocessing.connection import Client

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: its model is reachable


def refresh_lm_head(model) -> int:
    """Re-run the weight post-processing of the output head (and of any module sharing its weight)."""
    done = 0
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(getattr(head, "quant_method", None), "process_weights_after_loading"):
        head.quant_method.process_weights_after_loading(head)
        done += 1
    return done


class Worker:
    def __init__(self):
        self.llm = None

    def init(
        self, model: str, dtype: str, max_model_len: int, seed: int, kv_cache_gb=None, gpu_memory: float = 0.3, **_
    ):
        from vllm import LLM

        t = time.perf_counter()
        kw = {}
        import torch

        # the GPU is shared with the trainer: the engine takes gpu_memory of it (weights + KV cache);
        # on CPU a fixed KV cache (vLLM's CPU default reserves most of the host's memory)
        if torch.cuda.is_available():
            kw["gpu_memory_utilization"] = gpu_memory
        else:
            kw["kv_cache_memory_bytes"] = int((kv_cache_gb or 1.0) * 2**30)
        self.llm = LLM(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=True,
            generation_config="vllm",  # no sampling defaults from the folder: the trainer's settings only
            enable_prefix_caching=False,
            **kw,
        )
        return {"seconds": time.perf_counter() - t, "vllm": __import__("vllm").__version__}

    def generate(self, prompts, max_tokens, temperature, top_k, top_p, seeds, stop_token_ids, ignore_eos=False, **_):
        from vllm import SamplingParams

        params = [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k if top_k else -1,
                top_p=top_p,
                seed=s,
                stop_token_ids=stop_token_ids,
                ignore_eos=ignore_eos,
                skip_special_tokens=False,
                detokenize=False,
            )
            for s in seeds
        ]
        t = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        rows = [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]
        return {"rows": rows, "seconds": time.perf_counter() - t}

    def sync(self, path: str, refresh_head: bool = True, **_):
        t = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        refreshed = sum(self.llm.apply_model(refresh_lm_head)) if refresh_head else 0
        self.llm.reset_prefix_cache()
        return {"seconds": time.perf_counter() - t, "refreshed": refreshed}

    def logprobs(self, seqs, **_):
        from vllm import SamplingParams

        outs = self.llm.generate(
            [{"prompt_token_ids": s} for s in seqs],
            SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
            use_tqdm=False,
        )
        return {"logprobs": [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(outs, seqs)]}


def main() -> int:
    host, port, key = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
    conn = Client((host, port), authkey=key)
    worker = Worker()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return 0
        op = msg.pop("op")
        if op == "close":
            conn.send({"ok": True})
            return 0
        try:
            conn.send({"ok": True, **getattr(worker, op)(**msg)})
        except Exception as e:  # noqa: BLE001 - reported to the trainer, which raises it in one line
            conn.send(
                {
                    "ok": False,
                    "error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}",
                    "trace": traceback.format_exc(),
                }
            )


if __name__ == "__main__":
    sys.exit(main())
