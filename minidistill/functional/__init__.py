"""The math, as pure tensor-in/tensor-out functions that the tests check against closed forms
and float64 references: ``losses`` (token divergences, CE + divergence, truncated teachers),
``advantages`` (MiniLLM rewards, returns, whitening, importance weights, policy gradient,
single-step KL), ``kernels`` (fused autograd kernels for the big-vocabulary terms), ``xtok``
(cross-tokenizer character spans, alignment, shared vocabulary, ULD and span rewards).
Nothing here knows about runs, recipes or stages."""
