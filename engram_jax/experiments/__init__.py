"""Experiments that check the papers' claims at small scale, on any text corpus:

    python -m engram_jax.experiments.<name> --data_path=PATH --workdir=DIR --steps=N --seeds=K \
        [--jobs=J]

`iso_param` (Engram + MoE vs MoE vs dense at matched parameters), `allocation` (loss against the
share of the sparse budget in routed experts), `hyper_stability` (residual / HC / mHC / mHC-lite)
and `gate_analysis` (the gate's heatmap, its top n-grams and the loss with Engram switched off).
Each writes `results.json`, PNG plots and `summary.md` into DIR; see docs/results.md.
"""
