"""Every accelerate config in recipes/accelerate loads with accelerate's own loader, names only
options ``accelerate launch`` knows, and resolves through its launch-argument validation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
EXPECTED = {
    "cpu_2proc": "MULTI_CPU",
    "ddp": "MULTI_GPU",
    "fsdp": "FSDP",
    "deepspeed_zero2": "DEEPSPEED",
    "deepspeed_zero3": "DEEPSPEED",
}


def test_the_expected_configs_exist():
    assert {c.stem for c in CONFIGS} >= set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_resolves(path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert str(cfg.distributed_type).split(".")[-1] == EXPECTED.get(path.stem, str(cfg.distributed_type).split(".")[-1])
    assert cfg.num_machines == 1 and cfg.num_processes >= 2
    # nested keys are copied onto the launch arguments without any check: each must be a real option
    dests = {a.dest for a in launch_command_parser()._actions}
    for key in cfg.fsdp_config:
        assert (key if key.startswith("fsdp_") else "fsdp_" + key) in dests, key
    for key in cfg.deepspeed_config:
        assert key in dests, key
    logging.getLogger("accelerate.commands.launch").setLevel(logging.ERROR)
    args, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(path), "-m", "minidistill.run", "r.yaml"])
    )
    assert args.num_processes == cfg.num_processes
    if cfg.fsdp_config:
        assert cfg.fsdp_config["fsdp_version"] == 2 and args.use_fsdp
    if cfg.deepspeed_config:
        assert args.use_deepspeed and cfg.deepspeed_config["gradient_accumulation_steps"] == 1
        assert cfg.deepspeed_config["zero_stage"] == int(path.stem[-1])


def test_fsdp_config_builds_accelerates_fsdp_plugin():
    """The environment the launcher hands each process builds a valid FSDP2 plugin."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env

    logging.getLogger("accelerate.commands.launch").setLevel(logging.ERROR)
    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(
            ["--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "-m", "minidistill.run", "r.yaml"]
        )
    )
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with patch_environment(**{k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
