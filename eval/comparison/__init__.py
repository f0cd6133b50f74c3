"""The comparison experiment (issue 14): SFT, KD, SeqKD, MiniLLM and TRL's on-policy distillation as
the MiniLLM paper runs them (MiniLLM and TRL start from the SFT student), plus three MiniLLM
ablations, scored on held-out instruction sets with paired bootstrap differences.

    python eval/compare.py --teacher runs/compare/teacher/sft/final --out runs/compare/main \
        --publish docs/compare/main                                  (the real run, see README)
    python eval/compare.py --steps 2 --max-examples 8 --seeds 10 --start-steps 2 --out runs/compare-smoke

1. start    recipes/compare/start.yaml: the teacher pruned to every 2nd layer and healed by
            pre-training distillation on plain text -> <out>/start/pd/final.
2. methods  each with --batch-size sequences per optimizer step, on the same training prompts
            (dolly_dev minus any item that is also a test item, first --train-examples of them,
            default steps x batch: one pass) written to <out>/data/train.jsonl:
              from the start, --steps steps:
              sft      recipes/compare/sft.yaml       CE on the gold responses
              kd       recipes/compare/kd.yaml        0.5 CE + 0.5 KL(teacher||student) per gold token
              seqkd    recipes/compare/seqkd.yaml     the teacher samples a response per prompt; SFT on them
              from the SFT student (the paper's order), --minillm-steps more steps:
              minillm  recipes/compare/minillm.yaml   reverse-KL policy gradient (PPO minibatch = 1 step)
              trl      trl.DistillationTrainer (TRL 1.16), beta = 1: on-policy, token-level reverse KL over
                       the full vocabulary at every sampled position; same prompts (our Alpaca template,
                       identical token ids), steps, batch, LR schedule and AdamW settings as minillm.
              sft_long SFT continued for as many steps (a second pass): the step-matched control
              minillm_a0 / minillm_nolen / minillm_nosingle / minillm_const / minillm_split /
              minillm_long / minillm_mask / minillm_split_mask  the ablations: minillm with mix_alpha 0
                       (no teacher-mixed sampling) / length_norm false / single_step false / a constant
                       0.2 (mix_alpha_end 0.2: the default before 2026-12-06) / student_rows 0.5 (half
                       of each buffer sampled at a = 0 carries the long-term term) / rollouts 2 x
                       --gen-tokens long / mask_truncated true (rollouts cut at the limit carry no
                       long-term term) / student_rows 0.5 and mask_truncated true.
            Training generations (seqkd's teacher, minillm's and trl's rollouts) are --gen-tokens long.
3. eval     right after each model is trained (so finished results exist early): sampled ROUGE-L
            (MiniLLM protocol: T 1, top_p 1, top_k 0, no_repeat_ngram 6, prompts <= 256 tokens) per
            seed and per item; the teacher and the main methods on every test set, the controls
            (sft_long and the ablations) on --control-tests, first --control-examples items. Analyses against the teacher: per-token reverse KL(q||p) on the model's
            own samples, forward KL(p||q) on the teacher's samples (first seed), both KLs on the gold
            responses, Dist-4, mean length, EOS rate, and ExAccErr at --exacc-lengths (from the same
            first-seed samples: R(l) along the model's own, l*eps(l) along the teacher's).
4. report   ROUGE-L mean with a 95% bootstrap CI over items (seed-averaged scores) and the Student-t
            CI over seeds; the paired difference minillm - every other model (and ablation - minillm),
            bootstrap over items with the same seeds; steps and wall time, own and with the init.

Writes <out>/results.json and <out>/table.md (atomically) after every evaluation; per-model
generations and summaries in <out>/eval/<model>/; with --publish DIR also the summaries (with the
per-item scores, without generations), results.json and table.md to DIR, to commit as they finish.
Finished pieces are reused on a rerun with the same settings (training via ``resume: auto``,
evaluations via their saved settings); --overwrite redoes everything.

The package: ``plan`` (the typed, validated :class:`Plan` of the flags), ``methods`` (our recipes,
patched and run), ``trl_baseline``, ``evaluate`` (each model scored through
``minidistill.scoring``, saved and reused), ``stats`` (pure statistics), ``report`` (table.md,
results.json, --publish) and ``cli`` (the flags and the run in order; ``eval/compare.py`` calls it).
"""
