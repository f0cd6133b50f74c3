"""Reading JSON and JSONL files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from minidistill.errors import UserError


def read_lines(path: Path, shown: str) -> Iterable[tuple[int, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{shown}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_jsonl(path: Path, shown: str) -> list[tuple[str, Any]]:
    out = []
    for lineno, line in read_lines(path, shown):
        if not line.strip():
            continue
        try:
            out.append((f"{shown}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{shown}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return out


def read_json_list(path: Path, shown: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{shown}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{shown}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise UserError(
            f"{shown}: expected a JSON list of records, got {json_type(data)} (use .jsonl for one record per line)"
        )
    return [(f"{shown}[{i}]", rec) for i, rec in enumerate(data)]


def json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )
