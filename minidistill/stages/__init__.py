"""Stages: one module per method (sft, kd, seqkd, pd, pd_store, minillm).

Each module exports ``Config`` (a dataclass extending ``config.TrainConfig`` with the method's
own settings) and ``run(run, cfg, student) -> loop.LoopResult``; the pipeline in ``run.py``
exports ``final/`` and hands the student to the next stage.
"""
