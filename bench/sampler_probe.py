"""Measure the options of minidistill.generation.sampler on random-init Llama models (no downloads).

Options compared (each row = one variant, median wall time over --repeats runs):
  plain       : no finished-row skipping, full prefill logits (logits_to_keep off)
  +keep1      : logits_to_keep=1 (only the last position's logits at prefill)
  +skip       : drop finished rows from both KV caches (DynamicCache.batch_select_indices)
  +keep1+skip : both (the default of sample())
  infer_mode  : default, but the loop under torch.inference_mode instead of no_grad
  threads=N   : default with torch.set_num_threads(N) (the other rows use --threads, default 1)
For a = 0 also: the teacher scored afterwards by one teacher-forced pass instead of stepping it.

Rows stop at a random, geometric length: ``--eos-frac`` of the vocabulary is passed as EOS ids,
so each step ends a row with probability ~eos-frac (random models have no real EOS behaviour).

  PYTHONPATH=. .venv/bin/python bench/sampler_probe.py --config tiny
  PYTHONPATH=. .venv/bin/python bench/sampler_probe.py --config smol --batch 8 --max-new 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minidistill.generation import sampler
from minidistill.generation.sampler import process_logits, sample

CONFIGS = {
    # name: (student kwargs, teacher kwargs); shared vocab
    "tiny": (  # ~10M student, ~27M teacher
        dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2),
        dict(
            hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2
        ),
        8192,
    ),
    "smol": (  # SmolLM2-135M shape as teacher, 10-layer pruned student
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=10,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        ),
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        ),
        49152,
    ),
}


def build(cfg: dict, vocab: int, seed: int, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, **cfg))
    return m.to(dtype).eval()


def teacher_posthoc(teacher, r: sampler.Rollout, chunk: int = 8) -> torch.Tensor:
    """Teacher log p of the sampled tokens from one teacher-forced pass. # (B, T)"""
    T = r.response_ids.shape[1]
    out = []
    with torch.no_grad():
        for i in range(0, r.batch_size, chunk):
            ids = torch.cat([r.prompt_ids[i : i + chunk], r.response_ids[i : i + chunk]], 1)
            m = torch.cat([r.prompt_mask[i : i + chunk], r.response_mask[i : i + chunk]], 1)
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            lg = teacher(input_ids=ids, attention_mask=m, position_ids=pos, logits_to_keep=T + 1).logits
            lp = torch.log_softmax(process_logits(lg[:, :-1]), -1)
            tok = r.response_ids[i : i + chunk]
            out.append(lp.gather(-1, tok[..., None])[..., 0] * r.response_mask[i : i + chunk])
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--eos-frac", type=float, default=1 / 24)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--only", default="", help="comma list of variants to run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the non-thread variants")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    s_cfg, t_cfg, vocab = CONFIGS[args.config]
    dtype = getattr(torch, args.dtype)
    student, teacher = build(s_cfg, vocab, 0, dtype), build(t_cfg, vocab, 1, dtype)
    n_s = sum(p.numel() for p in student.parameters()) / 1e6
    n_t = sum(p.numel() for p in teacher.parameters()) / 1e6
    B, P = args.batch, args.prompt_len
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, vocab, (B, P), generator=g)
    lens = torch.randint(P // 2, P + 1, (B,), generator=g)
    mask = (torch.arange(P)[None] >= (P - lens)[:, None]).long()  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    n_eos = max(1, int(vocab * args.eos_frac))
    eos = list(range(vocab - n_eos, vocab))
    print(
        f"config={args.config} student={n_s:.1f}M teacher={n_t:.1f}M vocab={vocab} B={B} P={P} "
        f"max_new={args.max_new} alpha={args.alpha} dtype={args.dtype} "
        f"threads={torch.get_num_threads()} eos_ids={n_eos}"
    )

    def run(skip: bool, keep1: bool, infer: bool = False, alpha: float | None = None):
        gen = torch.Generator().manual_seed(7)
        kw = dict(
            max_new_tokens=args.max_new,
            mix_alpha=args.alpha if alpha is None else alpha,
            eos_token_id=eos,
            pad_token_id=0,
            generator=gen,
            _skip_finished=skip,
            _last_logits_only=keep1,
        )
        if not infer:
            return sample(student, teacher, ids, mask, **kw)
        with torch.inference_mode():
            eos_t = torch.as_tensor(eos)
            return sampler._sample_loop(
                student, teacher, ids, mask, args.max_new, kw["mix_alpha"], (1.0, 0, 1.0), eos_t, 0, gen, skip, keep1,
                True,
            )  # fmt: skip

    def timeit(fn):
        fn()  # warm-up
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = fn()
            ts.append(time.perf_counter() - t0)
        return min(ts), r

    def with_threads(n, fn):
        def f():
            n0 = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                return fn()
            finally:
                torch.set_num_threads(n0)

        return f

    variants = {
        "plain": lambda: run(False, False),
        "+keep1": lambda: run(False, True),
        "+skip": lambda: run(True, False),
        "+keep1+skip": lambda: run(True, True),
        "infer_mode": lambda: run(True, True, infer=True),
    }
    for n in (1, 2):
        if n != args.threads:
            variants[f"threads={n}"] = with_threads(n, lambda: run(True, True))
    only = [v for v in args.only.split(",") if v]
    names = [v for v in variants if not only or v in only]
    # The machine is shared: interleave the variants (rotating order) and report min and median.
    times = {n: [] for n in names}
    results = {}
    for n in names:
        results[n] = variants[n]()  # warm-up
    for rep in range(args.repeats):
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    ref = results[names[0]]
    for n in names:
        r = results[n]
        ntok = int(r.response_mask.sum())
        same_tok = torch.equal(r.response_ids, ref.response_ids)
        diff = (
            max(
                (getattr(r, f) - getattr(ref, f)).abs().max().item()
                for f in ("student_logp", "mix_logp", "teacher_logp")
            )
            if same_tok
            else float("nan")
        )
        tmin, tmed = min(times[n]), statistics.median(times[n])
        print(
            f"{n:12s} min {tmin:7.2f} s  median {tmed:7.2f} s  {ntok / tmin:7.1f} tok/s  "
            f"T={r.response_ids.shape[1]} tokens={ntok} same_tokens={same_tok} "
            f"max_logp_diff={diff:.1e}",
            flush=True,
        )

    if not only or "posthoc" in only:
        # a = 0: teacher stepped with the student vs scored afterwards by one forward pass.
        t_step, r0 = timeit(lambda: run(True, True, alpha=0.0))
        # Student-only loop: same sampler with a near-zero-cost stand-in teacher (1 layer, width 16).
        dummy = build(
            dict(
                hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1
            ),
            vocab,
            2,
            dtype,
        )
        t_post, lp = timeit(lambda: teacher_posthoc(teacher, r0))
        t_solo, _ = timeit(
            lambda: sample(
                student,
                dummy,
                ids,
                mask,
                max_new_tokens=args.max_new,
                mix_alpha=0.0,
                eos_token_id=eos,
                pad_token_id=0,
                generator=torch.Generator().manual_seed(7),
            )
        )
        print(
            f"a=0 stepwise teacher {t_step:.2f} s | student-only loop (stand-in teacher) "
            f"{t_solo:.2f} s + post-hoc teacher pass {t_post:.2f} s "
            f"(max |diff| vs stepwise {(lp - r0.teacher_logp).abs().max().item():.2e})"
        )


if __name__ == "__main__":
    main()
