"""Where a run trains, decided before accelerate is built: the device type (for ``precision: auto``),
whether to hand accelerate ``cpu=True`` (CPU + gloo under a multi-process launcher), and the
``accelerate launch --cpu`` case where accelerate starts only one process (``run.main`` then
starts the workers itself with torchrun's agent).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minidistill.reporting.tracking import console


def has_device_backend() -> bool:
    """A device accelerate can run a multi-process group on (CUDA, XPU, NPU, HPU, ...)."""
    import accelerate.utils as au

    names = (
        "is_xpu_available",
        "is_npu_available",
        "is_mlu_available",
        "is_hpu_available",
        "is_musa_available",
        "is_sdaa_available",
        "is_neuron_available",
    )
    return torch.cuda.is_available() or any(getattr(au, n, lambda: False)() for n in names)


def device_type(device: str, cpu: bool) -> str:
    """The device type a run will train on, before accelerate is built (for ``precision: auto``)."""
    if cpu or device == "cpu":
        return "cpu"
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        # accelerate also picks XPU, NPU, MPS, ...: not the CPU, whose bf16 support says nothing there
        other = has_device_backend() or torch.backends.mps.is_available()
        return "accelerator" if other else "cpu"
    return device.split(":")[0]


def use_cpu(device: str) -> bool:
    """Whether to hand accelerate ``cpu=True``.

    ``device: auto`` under a multi-process launcher (torchrun, ``accelerate launch --multi_gpu``)
    on a machine without GPUs: accelerate 1.x builds a process group only for a GPU-like device
    unless told ``cpu=True``, so every process would silently train alone. Use CPU + gloo.
    """
    if device == "cpu":
        return True
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) >= 0
    return device == "auto" and distributed and not has_device_backend()


# ---- accelerate launch --cpu ------------------------------------------------------------------

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _accelerate_launch_argv(cmdline: list[str]) -> list[str] | None:
    """The arguments after ``accelerate launch`` in a command line, or None if it is not one."""
    for i, tok in enumerate(cmdline):
        base = Path(tok).name
        if base in ("accelerate-launch", "accelerate.commands.launch"):
            return cmdline[i + 1 :]
        if base in ("accelerate", "accelerate.commands.accelerate_cli") and cmdline[i + 1 : i + 2] == ["launch"]:
            return cmdline[i + 2 :]
    return None


def accelerate_cpu_processes(env=None, parent_cmdline: list[str] | None = None) -> int:
    """How many processes ``accelerate launch --cpu`` was asked for when it started only this one.

    accelerate 1.x sends ``--cpu`` (and ``distributed_type: MULTI_CPU`` configs) through its
    "simple launcher": ONE Python process, with MASTER_ADDR/MASTER_PORT set when more were
    asked for, and the other processes left to ``mpirun`` (``--mpirun_hostfile``). Without
    mpirun the job silently runs as a single process. Recognised here by accelerate's variables
    without any rank variables; the count comes from the parent ``accelerate launch`` command
    line, resolved by accelerate's own parser (config file included). Returns 1 otherwise.
    """
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes") or "MASTER_ADDR" not in env:
        return 1
    if any(k in env for k in RANK_VARS):
        return 1
    try:
        if parent_cmdline is None:
            import psutil

            parent_cmdline = psutil.Process(os.getppid()).cmdline()
        argv = _accelerate_launch_argv(parent_cmdline)
        if argv is None:
            return 1
        import logging

        from accelerate.commands.launch import _validate_launch_command, launch_command_parser

        launch_log = logging.getLogger("accelerate.commands.launch")
        level = launch_log.level
        launch_log.setLevel(logging.ERROR)  # the parent already printed its warnings
        try:
            args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
        finally:
            launch_log.setLevel(level)
    except (Exception, SystemExit):
        return 1
    if getattr(args, "mpirun_hostfile", None) or (args.num_machines or 1) > 1:
        return 1
    return max(1, int(args.num_processes or 1))


def relaunch_cpu_workers(n: int, argv: list[str]) -> int:
    """Run ``python -m minidistill.run argv`` as ``n`` local CPU processes (torchrun's agent)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    console.print(f"accelerate launch --cpu started one process for {n}: starting {n} gloo workers")
    args = torchrun.get_args_parser().parse_args(
        [
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(n),
            "--master_addr",
            os.environ["MASTER_ADDR"],
            "--master_port",
            os.environ.get("MASTER_PORT", "29500"),
            "--module",
            "minidistill.run",
            *argv,
        ]
    )
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0
