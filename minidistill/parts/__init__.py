"""What stages are built from; each part has one home and no part imports a stage:
``sources`` (instruction rows, prompts, corpus blocks, cached on the run; shuffled streams),
``objectives`` (loss terms as sums the loop divides by their counts), ``validation`` (held-out
sums, sampled ROUGE-L), ``rollouts`` (MiniLLM's collect -> buffer -> minibatch iteration),
``responses`` (the teacher's sampled responses, saved and reused), ``token_kd`` (word-level KD on
instruction rows) and ``scoring`` (a model against its teacher)."""
