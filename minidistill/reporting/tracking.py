"""Metrics: one JSONL file per run (``metrics.jsonl``), optional TensorBoard, console lines."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True, highlight=False)


class Metrics:
    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        self._tb_dir = Path(out_dir) / "tb" if enabled and tensorboard else None  # opened at the first log

    def _writer(self):
        if self._tb is None and self._tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self._tb_dir))
        return self._tb

    def log(self, stage: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), "stage": stage, "step": step}
        row.update({k: _clean(v) for k, v in values.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer() is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{stage}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fmt(values: dict, keys: list[str] | None = None) -> str:
    keys = keys or list(values)
    parts = []
    for k in keys:
        v = values.get(k)
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        elif v is not None:
            parts.append(f"{k} {v}")
    return "  ".join(parts)
