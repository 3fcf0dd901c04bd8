"""The memory tables' subsystem: everything that stores, initialises, updates and checkpoints the
large embedding tables (Engram's hashed n-gram tables), apart from the layers that read them.

- `initializers`: rows drawn block by block, on the device (sharded) or in host RAM.
- `row_optim`: row-sparse optimizers (lazy Adam, SGD) applied to the rows a step touched.
- `device_step`: the training step whose table update touches only the looked-up rows.
- `host_tables`: tables kept in host RAM, rows gathered before and scattered after each step.
- `row_files`: row files on disk, the row cache and gatherer used by decoding.
- `memory_item`: the `memory` checkpoint item, written and read in row blocks.

The package imports jax lazily per module; see docs/design.md for what may import what.
"""
