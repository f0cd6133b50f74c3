"""The comparison experiment (issue 14): SFT, KD, SeqKD, MiniLLM and TRL's on-policy distillation,
and three MiniLLM ablations, scored against the teacher. The code is the package ``eval/comparison``
(its docstring describes the experiment); this is its command line.

    python eval/compare.py --teacher runs/compare/teacher/sft/final --out runs/compare/main \
        --publish docs/compare/main                                  (the real run, see README)
    python eval/compare.py --steps 2 --max-examples 8 --seeds 10 --start-steps 2 --out runs/compare-smoke
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # minidistill (the repo root) and the comparison package (eval/)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from comparison.cli import build_parser, main, run  # noqa: E402

__all__ = ["build_parser", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
