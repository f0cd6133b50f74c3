"""Training mechanics shared by every stage: ``loop`` (the one loop: micro-batches, global token
counts per term, autocast, checkpoints, evaluation), ``batches`` (resumable shuffled streams),
``checkpoint`` (atomic checkpoints, HF export, atomic JSON) and ``schedules`` (WSD)."""
