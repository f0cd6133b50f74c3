"""What a run shows: ``tracking`` (console, metrics.jsonl, TensorBoard), ``report`` (report.md and
plots from a run folder) and ``analysis`` (per-token KL to the teacher, Dist-4, ExAccErr, ECE)."""
