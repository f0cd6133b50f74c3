"""Two CPU processes (gloo) against one: ``accelerate launch --cpu --num_processes 2`` runs one
2-process job, SFT/PD loss curves match the 1-process run with the same global batch, MiniLLM's
whitening and rollout statistics are global, and only the main process writes metrics.

Why not bitwise: the 2-process gradient is an all-reduce of two partial sums (and the token count
and logged loss are all-reduced too), so floating-point additions happen in another order than in
one process; the differences are float32 rounding (~1e-7 relative per step), compounded over the
steps through the weights. The tolerance (rtol 1e-4) is far above that and far below any real bug
(a wrong slice, a per-process normalisation, a missing all-reduce changes the loss at 1e-2 or more).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minidistill.functional import advantages as adv
from minidistill.parts import rollouts
from minidistill.pipeline.launch import _accelerate_launch_argv, accelerate_cpu_processes, use_cpu
from minidistill.reporting.tracking import read_metrics
from minidistill.run import main

pytestmark = pytest.mark.e2e  # end to end: `./test.sh -m 'not slow and not e2e'` skips it

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cli() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe), "launch"] if exe.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]


def accelerate_2proc(recipe: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch --cpu --num_processes 2 -m minidistill.run recipe overrides``."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(k, None)
    cmd = accelerate_cli() + [
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "minidistill.run",
        str(recipe),
        *overrides,
    ]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def losses(out: Path, stage: str) -> tuple[list[int], list[float], list[float]]:
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == stage]
    train = [r for r in rows if "loss" in r]
    return [r["step"] for r in train], [r["loss"] for r in train], [r["valid/loss"] for r in rows if "valid/loss" in r]


def compare_runs(one: Path, two: Path, stage: str) -> float:
    """Assert the 2-process curve equals the 1-process one (rtol); returns the max relative difference."""
    s1, l1, v1 = losses(one, stage)
    s2, l2, v2 = losses(two, stage)
    assert s2 == s1 and len(set(s2)) == len(s2), (s1, s2)  # one row per step: only the main process logs
    assert len(v2) == len(v1) >= 1
    a, b = torch.tensor(l1 + v1, dtype=torch.float64), torch.tensor(l2 + v2, dtype=torch.float64)
    torch.testing.assert_close(b, a, rtol=RTOL, atol=0.0)
    tokens1 = [r["tokens"] for r in read_metrics(one / "metrics.jsonl") if r["stage"] == stage and "tokens" in r]
    tokens2 = [r["tokens"] for r in read_metrics(two / "metrics.jsonl") if r["stage"] == stage and "tokens" in r]
    assert tokens2 == tokens1  # the same global batches
    return float(((b - a).abs() / a.abs()).max())


# ---- how the launch is recognised ------------------------------------------------------------


def test_accelerate_cpu_launch_is_recognised_from_the_parent_command_line(monkeypatch):
    monkeypatch.delenv("ACCELERATE_CONFIG_FILE", raising=False)
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    cli = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]
    run = ["-m", "minidistill.run", "r.yaml", "seed=1"]
    assert _accelerate_launch_argv(cli + ["--cpu"] + run) == ["--cpu"] + run
    assert _accelerate_launch_argv(["python", "-m", "accelerate.commands.launch", "--cpu"] + run) == ["--cpu"] + run
    assert _accelerate_launch_argv(["python", "-m", "minidistill.run", "r.yaml"]) is None
    assert accelerate_cpu_processes(env, cli + ["--cpu", "--num_processes", "3"] + run) == 3
    cfg = ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"
    assert accelerate_cpu_processes(env, cli + ["--config_file", str(cfg)] + run) == 2
    assert accelerate_cpu_processes(env, cli + ["--config_file", str(cfg), "--num_processes", "4"] + run) == 4
    # already one of several processes (torchrun / the relaunched workers / mpirun): nothing to do
    assert (
        accelerate_cpu_processes({**env, "RANK": "0", "WORLD_SIZE": "2"}, cli + ["--cpu", "--num_processes", "2"] + run)
        == 1
    )
    assert accelerate_cpu_processes({**env, "PMI_SIZE": "2"}, cli + ["--cpu", "--num_processes", "2"] + run) == 1
    # not accelerate's simple launcher, or several machines (needs mpirun): unchanged
    assert accelerate_cpu_processes({"MASTER_ADDR": "x"}, cli + ["--cpu", "--num_processes", "2"] + run) == 1
    assert accelerate_cpu_processes(env, ["python", "-m", "minidistill.run", "r.yaml"]) == 1
    assert (
        accelerate_cpu_processes(
            env,
            cli
            + [
                "--cpu",
                "--num_processes",
                "4",
                "--num_machines",
                "2",
                "--main_process_ip",
                "10.0.0.1",
                "--main_process_port",
                "1",
            ]
            + run,
        )
        == 1
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_device_auto_uses_cpu_under_a_multi_process_launcher(monkeypatch):
    for k in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert use_cpu("cpu") and not use_cpu("auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert use_cpu("auto") and not use_cpu("cuda")


# ---- 2 processes vs 1 ------------------------------------------------------------------------


def sft_stage(batch_size: int) -> list[dict]:
    return [
        {
            "type": "sft",
            "name": "sft",
            "max_steps": 4,
            "lr": 3e-3,
            "batch_size": batch_size,
            "warmup_steps": 0,
            "scheduler": "constant",
            "eval_every": 2,
            "keep_best": False,
        }
    ]


def test_sft_two_processes_match_one(recipe_file, tmp_path):
    """Global batch 8: one process with batch 8, two with 4 each (each takes its slice)."""
    one = recipe_file(sft_stage(8), name="one.yaml", output_dir=str(tmp_path / "one"))
    assert main([str(one)]) == 0
    two = recipe_file(sft_stage(4), name="two.yaml", output_dir=str(tmp_path / "two"), threads=1)
    res = accelerate_2proc(two)
    assert "starting 2 gloo workers" in res.stderr
    diff = compare_runs(tmp_path / "one", tmp_path / "two", "sft")
    print(f"SFT max relative loss difference 1 vs 2 processes: {diff:.2e}")
    from transformers import AutoModelForCausalLM

    w1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "sft" / "final").state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "sft" / "final").state_dict()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4


@pytest.mark.slow
def test_pd_two_processes_match_one(recipe_file, tmp_path):
    def pd(batch_size):
        return [
            {
                "type": "pd",
                "name": "pd",
                "max_steps": 4,
                "lr": 3e-3,
                "batch_size": batch_size,
                "warmup_steps": 0,
                "scheduler": "constant",
                "eval_every": 2,
                "alpha": 0.5,
                "top_k": 8,
                "top_p": 0.95,
                "eval_at_start": False,
            }
        ]

    one = recipe_file(pd(4), name="one.yaml", output_dir=str(tmp_path / "one"))
    assert main([str(one)]) == 0
    two = recipe_file(pd(2), name="two.yaml", output_dir=str(tmp_path / "two"), threads=1)
    accelerate_2proc(two)
    diff = compare_runs(tmp_path / "one", tmp_path / "two", "pd")
    print(f"PD max relative loss difference 1 vs 2 processes: {diff:.2e}")


@pytest.mark.slow
def test_minillm_two_processes_complete_and_log_once(recipe_file, tmp_path):
    stages = [
        {
            "type": "minillm",
            "name": "minillm",
            "max_steps": 4,
            "lr": 1e-3,
            "warmup_steps": 0,
            "num_rollouts": 8,
            "batch_size": 2,
            "rollout_batch_size": 4,
            "ppo_epochs": 1,
            "max_new_tokens": 12,
            "eval_every": 2,
            "eval_examples": 3,
            "eval_max_new_tokens": 8,
            "lm_coef": 0.5,
            "lm_batch_size": 2,
        }
    ]
    path = recipe_file(stages, threads=1)
    accelerate_2proc(path)
    out = tmp_path / "run"
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "minillm"]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    valid = [r for r in rows if "valid/rougeL" in r]
    assert [r["step"] for r in valid] == [2, 4]  # gathered once per evaluation, not once per process
    # 8 rollouts per iteration, 4 per process, minibatches of 2 per process: 2 steps per buffer
    assert all(r["response_length"] > 0 and 0 <= r["eos_rate"] <= 1 for r in train)
    assert train[0]["reward"] == train[1]["reward"] != train[2]["reward"]  # stats of the whole (global) buffer
    assert (out / "minillm" / "final" / "config.json").is_file()


# ---- MiniLLM: whitening and rollout statistics over both processes ---------------------------


def _collect_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of ``world`` gloo processes: sample this process's rollouts with RolloutSource.collect."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from tiny_tokenizer import make_tokenizer, tiny_llama

    from minidistill.config import build
    from minidistill.parts import rollouts
    from minidistill.stages import minillm
    from minidistill.teacher import Teacher

    acc = Accelerator(cpu=True)
    assert acc.num_processes == world
    tok = make_tokenizer()
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    cfg = build(
        minillm.Config,
        {
            "type": "minillm",
            "name": "m",
            "num_rollouts": 8,
            "batch_size": 2,
            "rollout_batch_size": 4,
            "max_new_tokens": 10,
            "lm_coef": 0.0,
            "preset": "minidistill",
        },
        "t:",
    )
    run = SimpleNamespace(
        accelerator=acc,
        device=acc.device,
        teacher=Teacher(teacher, tok, "t", vocab_size=len(tok)),
        tokenizer=tok,
        vocab_size=len(tok),
        precision="fp32",
        recipe=SimpleNamespace(seed=0),
    )
    prompts = [
        tok(p).input_ids
        for p in [
            "Say hi",
            "A longer prompt here",
            "Q",
            "Name a fruit",
            "2 and 3",
            "Spell dog",
            "Opposite of hot",
            "An animal",
        ]
    ]
    source = rollouts.RolloutSource(run, cfg, student, prompts, None)
    source.collect()
    keep = ("returns", "advantages", "response_mask", "rewards", "student_logp", "teacher_logp", "response_ids")
    torch.save({**{k: source.buffer.tensors()[k] for k in keep}, "stats": source.stats}, Path(out) / f"rank{rank}.pt")
    acc.wait_for_everyone()
    acc.end_training()


def _pad_cat(xs: list[torch.Tensor], value=0) -> torch.Tensor:
    T = max(x.shape[1] for x in xs)
    return torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value) for x in xs])


def test_minillm_whitening_and_stats_are_global(tmp_path):
    """Two gloo processes each sample 4 rollouts; their whitened advantages must equal whitening
    the 8 rollouts together in one process (and differ from whitening each half alone)."""
    import torch.multiprocessing as mp

    mp.start_processes(_collect_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(p["response_mask"].shape[0] == 4 for p in parts)
    assert not torch.equal(parts[0]["response_ids"][:, :4], parts[1]["response_ids"][:, :4])  # own prompts / seeds
    mask = _pad_cat([p["response_mask"] for p in parts])
    R = _pad_cat([p["returns"] for p in parts])
    together = adv.whiten(R, mask)  # one process, all 8 rollouts
    got = _pad_cat([p["advantages"] for p in parts])
    valid = mask.bool()
    torch.testing.assert_close(got[valid], together[valid], rtol=1e-6, atol=1e-6)
    alone = adv.whiten(parts[0]["returns"], parts[0]["response_mask"])
    assert not torch.allclose(
        alone[parts[0]["response_mask"].bool()], parts[0]["advantages"][parts[0]["response_mask"].bool()], atol=1e-4
    )
    # logged rollout statistics: identical on both processes and equal to those of the 8 rollouts
    buf = {k: _pad_cat([p[k] for p in parts]) for k in ("response_mask", "rewards", "student_logp", "teacher_logp")}
    buf["response_ids"] = _pad_cat([p["response_ids"] for p in parts], value=1)
    from tiny_tokenizer import make_tokenizer

    expect = rollouts.rollout_stats(buf, make_tokenizer().eos_token_id, mix_alpha=0.2)  # the preset a
    for p in parts:
        assert p["stats"].keys() == expect.keys()
        for k in expect:
            assert p["stats"][k] == pytest.approx(expect[k], rel=1e-6, abs=1e-9), k


# ---- FSDP: the frozen teacher is sharded too -------------------------------------------------


def _fsdp_teacher_worker(rank: int, world: int, port: int, out: str) -> None:
    """Shard the tiny teacher with build.shard_teacher over 2 gloo processes. accelerate enables FSDP
    only for GPU process groups, so the accelerator is a stand-in carrying a real FSDP2 plugin."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from tiny_tokenizer import make_tokenizer, tiny_llama
    from torch.distributed.fsdp import FSDPModule

    from minidistill import models
    from minidistill.pipeline.build import shard_teacher
    from minidistill.teacher import Teacher

    acc = Accelerator(cpu=True)
    teacher = models.freeze(tiny_llama(make_tokenizer(), seed=2))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad():
        ref = teacher(input_ids=ids).logits
    full = sum(p.numel() for p in teacher.parameters())
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    fake = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        torch_device_mesh=None,
        mixed_precision="no",
        device=acc.device,
        is_main_process=acc.is_main_process,
        parallelism_config=None,
    )
    run = SimpleNamespace(
        accelerator=fake,
        sharded=True,
        fsdp=True,
        teacher=Teacher(teacher, None, "t"),
        recipe=SimpleNamespace(stages=[]),
    )
    shard_teacher(run)
    sharded = run.teacher.model
    local = sum(p.to_local().numel() for p in sharded.parameters())
    layers = models.decoder_layers(sharded)
    with torch.no_grad():
        got = sharded(input_ids=ids).logits
    torch.save(
        {
            "full": full,
            "local": local,
            "max_diff": float((got - ref).abs().max()),
            "training": sharded.training,
            "layer_units": all(isinstance(m, FSDPModule) for m in layers),
            "root_unit": isinstance(sharded, FSDPModule),
        },
        Path(out) / f"fsdp{rank}.pt",
    )
    acc.wait_for_everyone()
    acc.end_training()


@pytest.mark.slow
def test_fsdp_shards_the_teacher_per_layer_and_keeps_its_outputs(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _fsdp_teacher_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    res = [torch.load(tmp_path / f"fsdp{r}.pt", weights_only=True) for r in range(2)]
    for r in res:
        assert r["root_unit"] and r["layer_units"] and not r["training"]
        assert r["max_diff"] < 1e-5
    assert sum(r["local"] for r in res) == res[0]["full"]  # each parameter stored once across the processes
    assert max(r["local"] for r in res) < 0.6 * res[0]["full"]


def test_fsdp_refuses_stages_that_generate():
    from minidistill.errors import UserError
    from minidistill.pipeline.build import shard_teacher

    run = SimpleNamespace(
        sharded=True,
        recipe=SimpleNamespace(
            stages=[SimpleNamespace(name="sft", type="sft"), SimpleNamespace(name="rl", type="minillm")]
        ),
    )
    with pytest.raises(UserError, match="rl generate text"):
        shard_teacher(run)
