"""The training program's parts; `engram_jax.train` is the command line and the setup that joins
them.

- `processes`: work done on process 0 only, and the check that every process agrees.
- `data_setup`: the tokenizer, the token and hashing specs, each process's batch streams.
- `state`: `TrainState`, the optimizers, the state initialised into its shardings.
- `steps`: the train and eval steps, the mixing diagnostics, evaluation.
- `restore`: checkpoint metadata, resume checks, restore and save.
- `loop`: the loop that steps, evaluates, logs, checkpoints and closes.
"""
