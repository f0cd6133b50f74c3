"""vLLM fixtures: the vLLM environment (.venv-vllm, tools/setup-vllm.sh), a tiny teacher/student
pair vLLM can load (head_dim 32), and one real OpenAI-compatible vLLM server for the session.
Every test here skips, with one line, where the vLLM environment is absent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def vllm_python() -> str | None:
    cand = os.environ.get("MINIDISTILL_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(cand).is_file():
        return None
    ok = subprocess.run([cand, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"])
    return cand if ok.returncode == 0 else None


@pytest.fixture(scope="session")
def vllm_py() -> str:
    py = vllm_python()
    if py is None:
        pytest.skip("vLLM not installed: run tools/setup-vllm.sh (creates .venv-vllm) to run tests/vllm_tests")
    return py


@pytest.fixture(scope="session")
def pair(tmp_path_factory, vllm_py) -> dict:
    """A tiny teacher (4 layers, hidden 128) and a 2-layer student pruned from it, as HF folders."""
    from tiny_assets import save_tiny_teacher, write_tiny_data
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minidistill import models

    root = tmp_path_factory.mktemp("vllm_pair")
    teacher = save_tiny_teacher(root / "teacher", hidden=128)
    student = models.prune_layers(AutoModelForCausalLM.from_pretrained(teacher), [0, 3])
    student.save_pretrained(root / "student")
    AutoTokenizer.from_pretrained(teacher).save_pretrained(root / "student")
    (root / "data").mkdir()
    return {"teacher": teacher, "student": root / "student", "data": write_tiny_data(root / "data"), "root": root}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(pair, vllm_py, tmp_path_factory):
    """``python -m vllm.entrypoints.openai.api_server`` over the tiny teacher, on 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    cmd = [
        vllm_py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(pair["teacher"]),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-logprobs", "-1", "--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-bytes", str(2**30),
    ]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                    if json.loads(r.read())["data"]:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() - t0 > 400:
                tail = log.read_text()[-2000:]
                pytest.fail(f"vLLM server did not start ({time.time() - t0:.0f} s):\n{tail}")
            time.sleep(1)
        sys.stderr.write(f"\nvLLM server ready in {time.time() - t0:.0f} s\n")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
