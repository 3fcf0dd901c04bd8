"""Training plots from `metrics.jsonl`: the PNGs of `<workdir>/plots/`.

`python -m engram_jax.plot --workdir=DIR` redraws them for any run (finished or running);
`--workdir=A --workdir=B --out_dir=DIR` draws several runs on the same figures to compare them.
During training, `PlotRefresher` redraws them in a background thread at each evaluation and at the
end, so the training loop never waits for matplotlib.

Figures (each only when its metrics exist):
  loss.png            training and eval loss, and eval bits per byte, against step
  engram_gate.png     mean Engram gate of each Engram layer against step
  hc_amax_gain.png    composite Amax gain of the residual mixing (forward and backward), mHC/HC
  moe_load.png        MoE load violation (max expert load x experts - 1) against step
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from engram_jax.metrics import read_metrics

logger = logging.getLogger(__name__)

PLOTS_DIRNAME = "plots"
_GATE_LAYER = re.compile(r"^engram_gate_mean/layer_(\d+)$")


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that carry a finite `key`."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def _new_figure(panels: int = 1):
    """A pyplot-free Agg figure (safe in a background thread, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.2 * panels), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(panels, 1, i + 1) for i in range(panels)]
    return figure, axes


def _finish(
    figure, axes: Sequence, out_dir: str, name: str, *, legend: bool = True, grid_which="major"
) -> str:
    """Grids (and legends) the panels, writes `<out_dir>/<name>` and returns its path."""
    for ax in axes:
        ax.grid(alpha=0.3, which=grid_which)
        if legend:
            ax.legend(fontsize="small")
    path = os.path.join(out_dir, name)
    _save(figure, path)
    return path


def _save(figure, path: str) -> None:
    """Writes the PNG so that no reader sees half a file: a local file under a temporary name,
    then renamed; a URL (gs://, through etils.epath) as one object write."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    if "://" in path:
        from etils import epath

        epath.Path(path).write_bytes(buffer.getvalue())
        return
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)


def _label(run: str, many: bool, what: str) -> str:
    return f"{run}: {what}" if many else what


def _plot_loss(runs: dict[str, list[dict]], out_dir: str) -> str | None:
    if not any(
        _series(rows, "train_loss")[0] or _series(rows, "eval_loss")[0] for rows in runs.values()
    ):
        return None
    figure, (loss_ax, bpb_ax) = _new_figure(2)
    many = len(runs) > 1
    for index, (run, rows) in enumerate(runs.items()):
        color = f"C{index}"
        loss_ax.plot(
            *_series(rows, "train_loss"), color=color, alpha=0.6, label=_label(run, many, "train")
        )
        loss_ax.plot(
            *_series(rows, "eval_loss"), "o-", color=color, label=_label(run, many, "eval")
        )
        bpb_ax.plot(
            *_series(rows, "eval_bits_per_byte"), "o-", color=color, label=run if many else "eval"
        )
    loss_ax.set_ylabel("cross-entropy (nats / token)")
    bpb_ax.set_ylabel("eval bits per byte")
    bpb_ax.set_xlabel("step")
    return _finish(figure, (loss_ax, bpb_ax), out_dir, "loss.png")


def _plot_gates(runs: dict[str, list[dict]], out_dir: str) -> str | None:
    figure, (ax,) = _new_figure()
    drawn = False
    many = len(runs) > 1
    for index, (run, rows) in enumerate(runs.items()):
        layers = sorted(
            {int(m.group(1)) for row in rows for k in row if (m := _GATE_LAYER.match(k))}
        )
        styles = ["-", "--", ":", "-."]
        for layer in layers:
            steps, values = _series(rows, f"engram_gate_mean/layer_{layer}")
            # One color per layer for one run; one color per run (line style per layer) for several.
            color = f"C{index}" if many else f"C{layer}"
            style = styles[layer % len(styles)] if many else "-"
            label = _label(run, many, f"Engram layer #{layer}")
            ax.plot(steps, values, style, color=color, label=label)
            drawn = True
    if not drawn:
        return None
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("mean gate (training batch)")
    ax.set_title("Engram gate per Engram layer (#i = i-th entry of engram.layer_ids)")
    return _finish(figure, (ax,), out_dir, "engram_gate.png")


def _plot_hc(runs: dict[str, list[dict]], out_dir: str) -> str | None:
    keys = (
        ("hc_composite_forward_gain", "-", "forward"),
        ("hc_composite_backward_gain", "--", "backward"),
    )
    if not any(_series(rows, keys[0][0])[0] for rows in runs.values()):
        return None
    figure, (ax,) = _new_figure()
    many = len(runs) > 1
    drawn: list[float] = []
    for index, (run, rows) in enumerate(runs.items()):
        for which, (key, style, what) in enumerate(keys):
            steps, values = _series(rows, key)
            if steps:
                # One color per run for several runs; forward/backward colors for one run.
                color = f"C{index}" if many else f"C{which}"
                ax.plot(
                    steps, values, style, marker="o", color=color, label=_label(run, many, what)
                )
                drawn += values
    ax.axhline(1.0, color="gray", linewidth=0.8)
    if drawn and max(drawn) / max(min(drawn), 1e-30) > 10:
        ax.set_yscale("log")  # an unconstrained HC gain can grow by orders of magnitude
    ax.set_xlabel("step")
    ax.set_ylabel("composite Amax gain")
    ax.set_title("Residual mixing, bottom to top (1 = no amplification)")
    return _finish(figure, (ax,), out_dir, "hc_amax_gain.png", grid_which="both")


def _plot_moe(runs: dict[str, list[dict]], out_dir: str) -> str | None:
    if not any(_series(rows, "moe_max_violation")[0] for rows in runs.values()):
        return None
    figure, (ax,) = _new_figure()
    many = len(runs) > 1
    for index, (run, rows) in enumerate(runs.items()):
        ax.plot(*_series(rows, "moe_max_violation"), color=f"C{index}", label=run if many else None)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("max load x experts - 1")
    ax.set_title("MoE load violation (0 = perfectly balanced), mean over MoE layers")
    return _finish(figure, (ax,), out_dir, "moe_load.png", legend=many)


def draw_plots(workdirs: str | Sequence[str], out_dir: str | None = None) -> list[str]:
    """Draws every figure whose metrics exist and returns the PNG paths.

    Args:
      workdirs: one run directory (or its `metrics.jsonl`), or several to compare on one figure.
      out_dir: where the PNGs go; default `<workdir>/plots` for one run (required for several).
    """
    if isinstance(workdirs, (str, os.PathLike)):
        workdirs = [workdirs]
    workdirs = [os.fspath(w) for w in workdirs]
    if not workdirs:
        raise ValueError("draw_plots: workdirs is empty; expected at least one run directory")
    if out_dir is None:
        if len(workdirs) > 1:
            raise ValueError(
                f"draw_plots: {len(workdirs)} workdirs and no out_dir; expected an out_dir for "
                "the comparison figures"
            )
        out_dir = os.path.join(workdirs[0], PLOTS_DIRNAME)
    runs: dict[str, list[dict]] = {}
    for workdir in workdirs:
        name = os.path.basename(os.path.normpath(workdir)) or workdir
        while name in runs:  # two runs with the same directory name
            name += "'"
        runs[name] = read_metrics(workdir)
    if "://" in out_dir:
        from etils import epath

        epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(out_dir, exist_ok=True)
    drawers = (_plot_loss, _plot_gates, _plot_hc, _plot_moe)
    return [path for draw in drawers if (path := draw(runs, out_dir)) is not None]


class PlotRefresher:
    """Redraws `<workdir>/plots/` in a background thread, one drawing at a time.

    `refresh()` returns at once: it starts a drawing, or, when one is running, asks for one more
    after it (requests in between merge). `close()` waits for the running drawing and draws a last
    time. A failure is logged, never raised: plots must not stop a training run.

    Args:
      workdir: the run directory (its `metrics.jsonl` must be flushed before `refresh`).
      enabled: a disabled refresher does nothing (processes other than 0).
      draw: the drawing function (default `draw_plots`).
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        draw: Callable[[str], Any] = draw_plots,
    ):
        self._workdir = workdir
        self._enabled = enabled
        self._draw = draw
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._busy = False  # a drawing thread runs (set and cleared under the lock)
        self._again = False

    def refresh(self) -> None:
        """Schedules a redraw without waiting for it."""
        if not self._enabled:
            return
        with self._lock:
            if self._busy:
                self._again = True
                return
            self._busy = True
            self._thread = threading.Thread(target=self._run, name="plots", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Waits for the running drawing, then draws the final state."""
        if not self._enabled:
            return
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()
        self._draw_once()

    def _run(self) -> None:
        while True:
            self._draw_once()
            with self._lock:
                if not self._again:
                    self._busy = False
                    return
                self._again = False

    def _draw_once(self) -> None:
        try:
            self._draw(self._workdir)
        except Exception:
            logger.warning("could not draw the plots of %s", self._workdir, exc_info=True)


def main(argv: list[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    paths = draw_plots(values.workdir, values.out_dir or None)
    for path in paths:
        print(path)
    if not paths:
        print("no plottable metrics found")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_multi_string(
        "workdir", None, "Run directory (repeat the flag to compare several runs on one figure)."
    )
    flags.DEFINE_string(
        "out_dir", "", "Where the PNGs go (default <workdir>/plots; required for several runs)."
    )
    flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
    from engram_jax import cli

    _define_flags()
    cli.run(main)
