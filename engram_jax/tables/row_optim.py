"""Row-wise sparse optimizers for the Engram tables: SGD, row-wise Adagrad and lazy Adam.

A step touches a few thousand rows of a table of millions, so the tables are updated the way
embedding systems update them: the step's unique rows `[U]` are gathered, their summed gradients
`[U, W]` computed, and only those rows and their optimizer state are written back. Rows that no
step touches never change, their state included (this is what "lazy" means).

The per-row maths (`update_rows`) is written once against an array namespace, so the device path
(`jax.numpy`, inside the jitted step) and the host path (`numpy`, on host-resident tables) apply
exactly the same rule. Both keep the same state layout, so a checkpoint moves between placements.

State per table `[R, W]` (names are the checkpoint's leaf names):
- `sgd`: none.
- `adagrad`: `accumulator [R]`, one running sum of the row's mean squared gradient per row.
- `adam`: `mu [R, W]`, `nu [R, W]` moments and `count [R]` int32, how many steps touched the row.
  Bias correction uses the row's own count (`1 - b1**count`), not the global step: a row first
  touched at step 10,000 then gets a fully corrected first update instead of one scaled by the
  global correction (which has long reached 1 while the row's moments are fresh). This matches
  what dense Adam would do for a row whose gradient is nonzero at every step it exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from engram_jax import axes

RowOptimizerKind = Literal["sgd", "adagrad", "adam"]
KINDS: tuple[str, ...] = ("sgd", "adagrad", "adam")


@dataclasses.dataclass(frozen=True)
class RowOptimizer:
    """One sparse table optimizer (see the module docstring for the state layout).

    Attributes:
      kind: "sgd", "adagrad" (row-wise) or "adam" (lazy, per-row bias correction).
      learning_rate: the table learning rate, a float or a schedule of the global step (already
        including any multiplier over the dense rate).
      b1, b2, eps: Adam decays and epsilon (adam); eps is also Adagrad's denominator epsilon.
      weight_decay: decoupled decay `lr * wd * row` on touched rows only (adam and sgd); 0 = off.
      initial_accumulator: Adagrad's starting accumulator value.
    """

    kind: RowOptimizerKind = "adam"
    learning_rate: optax.ScalarOrSchedule = 1e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    initial_accumulator: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"RowOptimizer: kind={self.kind!r}; expected one of {list(KINDS)}")
        if self.weight_decay < 0:
            raise ValueError(f"RowOptimizer: weight_decay={self.weight_decay}; expected >= 0")
        if self.kind == "adagrad" and self.weight_decay:
            raise ValueError(
                "RowOptimizer: weight_decay is not supported with kind='adagrad'; expected 0"
            )
        if self.initial_accumulator < 0:
            raise ValueError(
                f"RowOptimizer: initial_accumulator={self.initial_accumulator}; expected >= 0"
            )

    def lr(self, step: Any) -> Any:
        """The learning rate at global step `step` (0-based, the step being taken)."""
        if callable(self.learning_rate):
            return self.learning_rate(step)
        return self.learning_rate

    # -- state ------------------------------------------------------------------------------------

    def state_shapes(self, rows: int, width: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """`{name: (shape, dtype)}` of one table's state."""
        if self.kind == "sgd":
            return {}
        if self.kind == "adagrad":
            return {"accumulator": ((rows,), np.float32)}
        return {
            "mu": ((rows, width), np.float32),
            "nu": ((rows, width), np.float32),
            "count": ((rows,), np.int32),
        }

    def init_numpy(self, rows: int, width: int) -> dict[str, np.ndarray]:
        """Host (numpy) state of one `[rows, width]` table."""
        out = {}
        for name, (shape, dtype) in self.state_shapes(rows, width).items():
            fill = self.initial_accumulator if name == "accumulator" else 0
            out[name] = np.full(shape, fill, dtype)
        return out

    def init(self, memory: Any) -> Any:
        """Device state for a tree of tables (plain or logically boxed `[R, W]` leaves).

        Boxed tables give boxed state with the table's row axis, so the state is row-sharded
        exactly like its table (`sharding.tree_shardings`).
        """

        def one(leaf: Any) -> dict[str, Any]:
            boxed = isinstance(leaf, nn.LogicallyPartitioned)
            value = leaf.unbox() if boxed else leaf
            rows, width = value.shape
            state = {}
            for name, (shape, dtype) in self.state_shapes(rows, width).items():
                fill = self.initial_accumulator if name == "accumulator" else 0
                array = jnp.full(shape, fill, dtype)
                if boxed:
                    names = (axes.TABLE_ROWS, axes.MEMORY_WIDTH)[: len(shape)]
                    array = nn.LogicallyPartitioned(array, names, mesh=leaf.mesh, rules=leaf.rules)
                state[name] = array
            return state

        return jax.tree.map(one, memory, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

    # -- the per-row rule -------------------------------------------------------------------------

    def update_rows(
        self,
        rows_UW: Any,
        grads_UW: Any,
        state_U: dict[str, Any],
        lr: Any,
        xp: Any = jnp,
    ) -> tuple[Any, dict[str, Any]]:
        """New values of U distinct rows and their state, from their summed gradients.

        Args:
          rows_UW: `[U, W]` current rows (float32).
          grads_UW: `[U, W]` gradients, duplicates of a row within the step already summed.
          state_U: this optimizer's state gathered at the same rows (`[U]` or `[U, W]` leaves).
          lr: learning rate of this step (scalar).
          xp: array namespace, `jax.numpy` on device or `numpy` on the host.

        Returns:
          `(new_rows_UW, new_state_U)`.
        """
        f32 = xp.float32
        g_UW = grads_UW.astype(f32)
        p_UW = rows_UW.astype(f32)
        lr = xp.asarray(lr, f32)
        if self.kind == "sgd":
            if self.weight_decay:
                p_UW = p_UW - lr * f32(self.weight_decay) * p_UW
            return p_UW - lr * g_UW, {}
        if self.kind == "adagrad":
            # One accumulator per row: the mean of the squared gradient over the row's W entries.
            acc_U = state_U["accumulator"] + xp.mean(g_UW * g_UW, axis=1)
            denom_U = xp.sqrt(acc_U) + f32(self.eps)
            return p_UW - lr * g_UW / denom_U[:, None], {"accumulator": acc_U}
        b1, b2 = f32(self.b1), f32(self.b2)
        count_U = state_U["count"] + 1
        mu_UW = b1 * state_U["mu"] + (f32(1) - b1) * g_UW
        nu_UW = b2 * state_U["nu"] + (f32(1) - b2) * g_UW * g_UW
        c_U = count_U.astype(f32)[:, None]
        mu_hat_UW = mu_UW / (f32(1) - b1**c_U)
        nu_hat_UW = nu_UW / (f32(1) - b2**c_U)
        step_UW = mu_hat_UW / (xp.sqrt(nu_hat_UW) + f32(self.eps))
        if self.weight_decay:
            step_UW = step_UW + f32(self.weight_decay) * p_UW
        return p_UW - lr * step_UW, {"mu": mu_UW, "nu": nu_UW, "count": count_U}


def from_config(cfg: Any, schedule: Callable | float) -> RowOptimizer:
    """The table optimizer of a validated config: `table_optimizer` at `table_lr_multiplier` x the
    base schedule, the dense Adam decays and epsilon, and the tables' own weight decay."""
    t, e = cfg.train, cfg.model.engram
    multiplier = float(e.table_lr_multiplier)
    if callable(schedule):
        base = schedule

        def learning_rate(step):
            return multiplier * base(step)

    else:
        learning_rate = multiplier * schedule
    return RowOptimizer(
        kind=t.table_optimizer,
        learning_rate=learning_rate,
        b1=t.adam_b1,
        b2=t.adam_b2,
        eps=t.adam_eps,
        weight_decay=float(e.table_weight_decay),
    )
