"""Experiments that check the papers' claims at small scale, on any text corpus:

    python -m engram_jax.experiments.<name> --data_path=PATH --workdir=DIR --steps=N --seeds=K \
        [--jobs=J]

`iso_param` (Engram + MoE vs MoE vs dense at matched parameters), `allocation` (loss against the
share of the sparse budget in routed experts), `hyper_stability` (residual / HC / mHC / mHC-lite)
and `gate_analysis` (the gate's heatmap, its top n-grams and the loss with Engram switched off).
Each writes `results.json`, PNG plots and `summary.md` into DIR; see docs/results.md.

What the experiments share, one job a module (none imports an experiment):

- `options`: the common flags, `Options`, `--set` overrides, the shipped configs they start from;
- `heldout`: the workdir's copy of the corpus, its held-out tail and the shared tokenizer;
- `runner`: each run's config, training (in process or in subprocesses), resuming, its record;
- `budget`: tokens seen, updates and lookups per table row, table rows for a target of updates;
- `sizing`: configs at matched total and activated parameters (the accounting, no arrays);
- `stats`: paired differences per seed and their Student t intervals;
- `report`: results.json and the shared parts of summary.md; `plots`: the PNG helpers;
- `floors`: the compressors' bits per byte; `json_config`: a run's config file for the trainer.
"""
