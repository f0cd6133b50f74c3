"""PD stage: the loss against a from-the-definition reference, config checks, and tiny pipelines
(PD beats LM-only on KL to the teacher, offline == online, store mismatches refused, resume)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_assets import crash_after_first_save
from transformers import AutoModelForCausalLM, AutoTokenizer

from minidistill import data
from minidistill.config import load_recipe
from minidistill.errors import UserError
from minidistill.functional import losses
from minidistill.reporting.tracking import read_metrics
from minidistill.run import main, run_recipe
from minidistill.stages import pd


def pd_stage(**kw) -> dict:
    stage = {
        "type": "pd",
        "name": "pd",
        "max_steps": 20,
        "batch_size": 4,
        "lr": 3e-3,
        "scheduler": "constant",
        "warmup_steps": 0,
        "eval_at_start": False,
    }
    stage.update(kw)
    return stage


def rows(out, stage="pd", key="loss"):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == stage and key in r]


# ---------------------------------------------------------------- the loss itself


def reference_target(teacher_logits: torch.Tensor, top_p: float, top_k: int, tau: float) -> torch.Tensor:
    """softmax(Truncate_top_p_k(z) / tau) as a dense (N, V) float64 matrix, row by row with Python loops."""
    out = torch.zeros(teacher_logits.shape, dtype=torch.float64)
    for n, z in enumerate(teacher_logits.double()):
        p = torch.softmax(z, -1)
        probs = p.tolist()
        order = sorted(range(len(probs)), key=lambda v: -probs[v])
        kept, mass = [], 0.0
        for v in order:
            if mass >= top_p or len(kept) == top_k:
                break
            kept.append(v)
            mass += probs[v]
        w = torch.tensor([probs[v] for v in kept], dtype=torch.float64) ** (1 / tau)
        out[n, kept] = w / w.sum()
    return out


@pytest.mark.parametrize("top_k", [5, 0])
def test_pd_loss_matches_reference_and_only_the_student_gets_gradients(top_k):
    from tiny_tokenizer import make_tokenizer, tiny_llama

    tok = make_tokenizer()
    teacher, student = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2).train()
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    V = len(tok)
    run = SimpleNamespace(teacher=teacher, vocab_size=V)
    cfg = pd.Config(alpha=0.7, top_p=0.6, top_k=top_k, temperature=2.0)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(0))
    loss_fn = pd.make_loss_fn(run, cfg, total=10)
    loss, metrics = loss_fn(student, {"input_ids": ids}, 3)

    with torch.no_grad():
        s = student(input_ids=ids).logits[:, :-1].reshape(-1, V).double()
        t = teacher(input_ids=ids).logits[:, :-1].reshape(-1, V)
    target = (
        reference_target(t, 0.6, top_k, 2.0) if top_k else reference_target(t, 1.0, V, 2.0)
    )  # top_k 0: no truncation
    logq = F.log_softmax(s, -1)
    ce = -logq.gather(-1, ids[:, 1:].reshape(-1, 1)).sum()
    kl = (target * (torch.log(target.clamp_min(1e-300)) - logq)).where(target > 0, 0.0).sum()
    assert float(loss.detach()) == pytest.approx(float(0.3 * ce + 0.7 * kl), rel=1e-4)
    n = ids.numel() - ids.shape[0]
    assert metrics["lm_loss"] == pytest.approx(float(ce) / n, rel=1e-4)
    assert metrics["kd_loss"] == pytest.approx(float(kl) / n, rel=1e-4)
    assert metrics["alpha"] == 0.7
    if top_k:
        pt = torch.softmax(t.double(), -1)
        keep = target > 0
        assert metrics["teacher_kept_mass"] == pytest.approx(float((pt * keep).sum(-1).mean()), rel=1e-4)
        assert metrics["student_kept_mass"] == pytest.approx(float((logq.exp() * keep).sum(-1).mean()), rel=1e-4)

    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher ran under no_grad
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())

    # alpha = 0 everywhere: plain LM loss, the teacher is never run
    calls.clear()
    lm_fn = pd.make_loss_fn(run, pd.Config(alpha=0.0), total=10)
    lm, m = lm_fn(student, {"input_ids": ids}, 0)
    assert not calls and float(lm.detach()) == pytest.approx(float(ce), rel=1e-4) and "kd_loss" not in m


@pytest.mark.parametrize(
    "kind,top_k,tau",
    [
        ("fkl", 6, 1.0),
        ("fkl", 6, 2.0),
        ("skew_fkl", 6, 0.5),
        ("skew_rkl", 6, 1.0),
        ("jsd", 6, 1.0),
        ("tv", 6, 1.0),
        ("ce", 6, 1.5),
        ("fkl", 0, 2.0),
        ("rkl", 0, 1.0),
        ("jsd", 0, 1.0),
        ("mse", 0, 1.0),
    ],
)
def test_fused_losses_equal_the_library_calls(kind, top_k, tau):
    from minidistill.models.logit_store import truncate_raw

    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 7, 50, generator=g) * 2).requires_grad_(True)
    z = torch.randn(3, 7, 50, generator=g) * 3
    labels = torch.randint(0, 50, (3, 7), generator=g)
    target = truncate_raw(z, 0.8, top_k) if top_k else z
    cfg = pd.Config(kd_kind=kind, top_k=top_k, temperature=tau, skew=0.2, beta=0.3)
    lm, kd, kept = pd.pd_losses(cfg, s, labels, target, chunk_size=5)
    mask = torch.ones(3, 7, dtype=torch.bool)
    ref_lm = losses.lm_loss(s, labels, mask)[0]
    ref_kd = losses.token_divergence(s, target, mask, kind, temperature=tau, skew=0.2, beta=0.3)[0]
    assert float(lm.detach()) == pytest.approx(float(ref_lm.detach()), rel=1e-5)
    assert float(kd.detach()) == pytest.approx(float(ref_kd.detach()), rel=1e-5)
    g1 = torch.autograd.grad(0.3 * lm + 0.7 * kd, s)[0]
    g2 = torch.autograd.grad(0.3 * ref_lm + 0.7 * ref_kd, s)[0]
    assert torch.allclose(g1, g2, atol=1e-6)
    if top_k:
        assert float(kept) / 21 == pytest.approx(float(losses.kept_mass(s.detach(), target).mean()), rel=1e-5)
    else:
        assert kept is None


def test_alpha_follows_the_schedule_by_step():
    cfg = pd.Config(alpha=0.9, alpha_min=0.1, alpha_schedule="linear_decrease")
    assert [round(pd.alpha_for(cfg, s, 5), 6) for s in range(5)] == [0.9, 0.7, 0.5, 0.3, 0.1]


def test_the_loss_takes_its_alpha_from_the_step_it_is_given():
    """The loop passes the optimizer step; the logged alpha is the schedule's at that step."""
    from tiny_tokenizer import make_tokenizer, tiny_llama

    tok = make_tokenizer()
    teacher, student = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    run = SimpleNamespace(teacher=teacher, vocab_size=len(tok))
    cfg = pd.Config(alpha=0.9, alpha_min=0.1, alpha_schedule="linear_decrease", top_k=5)
    fn = pd.make_loss_fn(run, cfg, total=5)
    ids = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    assert [round(fn(student, {"input_ids": ids}, s)[1]["alpha"], 6) for s in range(5)] == [0.9, 0.7, 0.5, 0.3, 0.1]


def test_alpha_and_lr_come_from_the_loop_step_under_grad_accum(recipe_file, tmp_path):
    """With grad_accum 3 every micro-batch of an update gets that update's step: the logged alpha
    at step s is the schedule's at s - 1 (0-based), and the wsd LR and wsd alpha share the phases."""
    stage = pd_stage(
        max_steps=5,
        grad_accum=3,
        batch_size=2,
        scheduler="wsd",
        warmup_steps=1,
        decay_steps=2,
        alpha_schedule="wsd",
        alpha=0.9,
        alpha_min=0.3,
        eval_every=0,
        top_k=5,
    )
    path = recipe_file([stage], output_dir=str(tmp_path / "run"), threads=1)
    assert main([str(path)]) == 0
    logged = rows(tmp_path / "run")
    cfg = pd.Config(scheduler="wsd", warmup_steps=1, decay_steps=2, alpha_schedule="wsd", alpha=0.9, alpha_min=0.3)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5]
    # (logged: the mean over the step's 3 micro-batches, hence approx)
    assert [r["alpha"] for r in logged] == pytest.approx([pd.alpha_for(cfg, s, 5) for s in range(5)], abs=1e-12)
    # the LR logged after update s is the one update s + 1 uses: alpha - alpha_min is proportional to it
    lrs = [3e-3 * 0.0] + [r["lr"] for r in logged[:-1]]  # warm-up starts at 0
    assert [0.3 + 0.6 * lr / 3e-3 for lr in lrs] == pytest.approx([r["alpha"] for r in logged], abs=1e-12)


def test_pd_source_resumes_from_old_checkpoints():
    """PD's batch source is a plain ShuffledBatches; a checkpoint written by the former step-counting
    wrapper ({"inner": ..., "drawn": ...}) still restores its position."""
    from minidistill.training.batches import ShuffledBatches

    def src():
        return ShuffledBatches(10, 2, lambda idx: {"idx": idx}, seed=0)

    a = src()
    for _ in range(7):
        a.next_batch()
    b = src()
    b.load_state_dict({"inner": a.state_dict(), "drawn": 7})
    assert b.next_batch() == a.next_batch()


@pytest.mark.parametrize(
    "stage,match",
    [
        ({"teacher_logits": "offline", "top_k": 0}, "top_k"),
        ({"kd_kind": "rkl"}, "kd_kind"),
        ({"kd_kind": "mse", "top_k": 50}, "kd_kind"),
        ({"alpha_schedule": "wsd", "alpha": 0.3, "alpha_min": 0.5}, "alpha_min"),
        ({"store": "/x"}, "store"),
        ({"alpha": 1.5}, "alpha"),
        ({"top_pp": 0.9}, "top_p"),
    ],
)
def test_config_errors(recipe_file, stage, match):
    with pytest.raises(UserError, match=match):
        load_recipe(recipe_file([pd_stage(**stage)]))


def test_full_distribution_kinds_allowed_without_truncation(recipe_file):
    r = load_recipe(recipe_file([pd_stage(kd_kind="rkl", top_k=0)]))
    assert r.stages[0].kd_kind == "rkl" and r.stages[0].top_k == 0


# ---------------------------------------------------------------- pipelines


def held_out(tiny_dir, tiny_data):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    blocks = data.pack_blocks(data.load_texts(tiny_data["corpus"]), tok, 32)
    return data.split_blocks(blocks, n_valid=4, seed=0)[1]  # as Run.corpus() splits it (seed 0, 4 blocks)


def kl_to_teacher(student_dir, tiny_dir, blocks) -> float:
    """Full-vocabulary forward KL(teacher || student) per token on ``blocks``."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    with torch.no_grad():
        t = teacher(input_ids=blocks).logits[:, :-1]
        s = student(input_ids=blocks).logits[:, :-1]
    total, count = losses.token_divergence(s, t, torch.ones(t.shape[:2], dtype=torch.bool), "fkl")
    return float(total / count)


def test_pd_lowers_kl_to_teacher_faster_than_lm_only(recipe_file, tmp_path, tiny_dir, tiny_data):
    finals = {}
    for name, extra in [("pd", {"eval_every": 10, "eval_at_start": True}), ("lm", {"alpha": 0.0})]:
        path = recipe_file([pd_stage(**extra)], name=f"{name}.yaml", output_dir=str(tmp_path / name), threads=1)
        assert main([str(path)]) == 0
        finals[name] = tmp_path / name / "pd" / "final"
    blocks = held_out(tiny_dir, tiny_data)
    kl = {name: kl_to_teacher(f, tiny_dir, blocks) for name, f in finals.items()}
    assert kl["pd"] < 0.5 * kl["lm"], kl
    out = tmp_path / "pd"
    logged = rows(out)
    assert {"lm_loss", "kd_loss", "alpha", "teacher_kept_mass", "student_kept_mass"} <= set(logged[0])
    assert all(r["alpha"] == 0.9 for r in logged)
    valid = rows(out, key="valid/ppl")
    assert [r["step"] for r in valid] == [0, 10, 20] and valid[-1]["valid/ppl"] < valid[0]["valid/ppl"]
    assert valid[-1]["valid/kd_loss"] < valid[0]["valid/kd_loss"]
    assert (out / "pd" / "best" / "config.json").is_file()
    assert all("kd_loss" not in r for r in rows(tmp_path / "lm"))  # LM-only never runs the teacher


def test_offline_matches_online(recipe_file, tmp_path):
    common = dict(
        max_steps=8, top_p=0.95, top_k=20, temperature=1.5, alpha_schedule="wsd", warmup_steps=2, scheduler="wsd"
    )
    on = recipe_file([pd_stage(**common)], name="on.yaml", output_dir=str(tmp_path / "on"), threads=1)
    off = recipe_file(
        [
            {"type": "pd_store", "name": "logits", "top_p": 0.95, "top_k": 20, "batch_size": 4, "shard_blocks": 16},
            pd_stage(teacher_logits="offline", **common),
        ],
        name="off.yaml",
        output_dir=str(tmp_path / "off"),
        threads=1,
    )
    assert main([str(on)]) == 0 and main([str(off)]) == 0
    store = tmp_path / "off" / "logits"
    assert (store / "header.json").is_file() and len(list(store.glob("shard_*.indices.npy"))) > 1
    a, b = rows(tmp_path / "on"), rows(tmp_path / "off")
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b):
        assert ra["alpha"] == rb["alpha"]
        for key in ("loss", "lm_loss", "kd_loss", "teacher_kept_mass", "student_kept_mass"):
            assert rb[key] == pytest.approx(ra[key], rel=2e-3, abs=1e-4), (ra["step"], key)
    s = rows(tmp_path / "off", stage="logits", key="bytes_per_token")[0]
    assert 80 <= s["bytes_per_token"] < 82  # 20 slots x (2 + 2) bytes, plus .npy headers
    assert not (store / "final").exists()  # pd_store trains nothing: no final/ export
    # running the same recipe again resumes: the store is re-checked, not recomputed; pd is skipped
    assert main([str(off), "resume=auto"]) == 0
    again = rows(tmp_path / "off", stage="logits", key="computed_blocks")
    assert [r["computed_blocks"] for r in again] == [s["computed_blocks"], 0] and s["computed_blocks"] > 0


def test_offline_refuses_a_store_for_other_data(recipe_file, tmp_path, capsys):
    a = recipe_file(
        [{"type": "pd_store", "name": "logits", "top_k": 8}], name="a.yaml", output_dir=str(tmp_path / "a"), threads=1
    )
    assert main([str(a)]) == 0
    store = tmp_path / "a" / "logits"
    cases = [
        ("block_len", {}, ["data.block_len=16"]),
        ("top_k", {"top_k": 9}, []),
        ("corpus_fingerprint", {}, ["seed=1"]),  # another held-out split: same block count, other blocks
        ("n_blocks", {}, ["data.max_blocks=10"]),
    ]
    for i, (field, extra, overrides) in enumerate(cases):
        stage = pd_stage(max_steps=1, teacher_logits="offline", store=str(store), **{"top_k": 8, **extra})
        path = recipe_file([stage], name=f"b{i}.yaml", output_dir=str(tmp_path / f"b{i}"), threads=1)
        capsys.readouterr()
        assert main([str(path), *overrides]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and f"logit store {field} is" in err[0] and str(store) in err[0], err
    # offline without a store anywhere
    path = recipe_file(
        [pd_stage(max_steps=1, teacher_logits="offline")], name="d.yaml", output_dir=str(tmp_path / "d"), threads=1
    )
    assert main([str(path)]) == 2
    assert "pd_store" in capsys.readouterr().err


def test_resume_restores_alpha_and_loss(recipe_file, tmp_path):
    stage = pd_stage(max_steps=4, save_every=2, alpha_schedule="linear_increase", alpha_min=0.2, alpha=0.8)
    a = recipe_file([stage], name="a.yaml", output_dir=str(tmp_path / "a"), threads=1)
    assert main([str(a)]) == 0
    b = recipe_file([stage], name="b.yaml", output_dir=str(tmp_path / "b"), threads=1)
    crash_after_first_save(lambda: run_recipe(load_recipe(b)))
    assert main([str(b), "resume=auto"]) == 0
    ra = {r["step"]: r for r in rows(tmp_path / "a")}
    rb = {r["step"]: r for r in rows(tmp_path / "b")}  # steps 1-2, then 3-4 after the resume
    assert [ra[s]["alpha"] for s in (1, 2, 3, 4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    for s in (3, 4):
        assert rb[s]["alpha"] == ra[s]["alpha"]
        assert rb[s]["loss"] == pytest.approx(ra[s]["loss"], rel=1e-6)
    assert not math.isnan(rb[4]["kd_loss"])
