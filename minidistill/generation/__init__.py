"""Drawing text from models: ``sampler`` (the teacher-mixed rollout sampler with KV caches, its
dynamic/static/compiled decode paths, and the teacher scoring pass) and ``evaluation`` (batched
HF ``generate`` sampling, ROUGE-L, the instruction-following protocol)."""
