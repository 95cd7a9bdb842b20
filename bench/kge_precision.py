"""Stage 1 in bf16 against fp32: validation and test MRR of two runs of one preset, and the step-time ratio.

    python bench/kge_precision.py --dataset wn18rr --fp32 runs/bench/embed-wn18rr-s28-fp32 \
        --bf16 runs/bench/embed-wn18rr-s28-bf16 [--note TEXT]

Both artifacts come from ``bench/kge_quality.py --fresh`` with the same preset, one with ``precision=fp32``,
one with ``precision=bf16``.  Reports each run's validation MRR (every validation triple, both sides,
filtered, at its best checkpoint), the paired test MRR and Hits@1 difference over the same test queries (95%
bootstrap CI, sign-flip permutation p for MRR, exact McNemar p for Hits@1), and the forward+backward step
time of both precisions on the preset's model, measured alternately in this process (a ratio, not a wall
time).  Writes bench/results/kge_precision.json keyed by dataset, and .md.

The rule, written before the bf16 run's result was known (session 28): ``precision: auto`` (bf16 where a
step measures >= 1.25x faster, kgtok.runtime.BF16_MIN_SPEEDUP) stays stage 1's default if, on WN18RR with
the preset ``embed_wn18rr`` trained from scratch on one machine where auto picks bf16, the bf16 run's
validation MRR is at least the fp32 run's minus 0.005.  Otherwise the default becomes fp32 and bf16 an
explicit option.  Test numbers are reported, never used for the choice.
"""
