"""engram_jax.plot: figures from metrics.jsonl rows, the command line over several runs, and the
background refresher (the training run's own plots are checked in test_train.py)."""

import json
import subprocess
import sys
import threading

import matplotlib.image
import pytest

from engram_jax import plot as plot_lib


def _write_run(workdir, *, hc: bool, offset: float = 0.0) -> None:
    workdir.mkdir(parents=True)
    rows = []
    for step in range(1, 21):
        row = {
            "step": step,
            "train_loss": 5.0 - 0.1 * step + offset,
            "engram_gate_mean/layer_0": 0.5,
            "engram_gate_mean/layer_1": 0.4,
            "moe_max_violation": 1.0 / step,
        }
        rows.append(row)
        if step % 10 == 0:
            evaluation = {"step": step, "eval_loss": 4.0 + offset, "eval_bits_per_byte": 1.5}
            if hc:
                evaluation["hc_composite_forward_gain"] = 1.0
                evaluation["hc_composite_backward_gain"] = 1.02
            rows.append(evaluation)
    rows.append({"step": 21, "train_loss": None})  # a non-finite value is skipped, not drawn
    with open(workdir / "metrics.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _assert_png(path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100, path


def test_one_run_draws_each_figure_whose_metrics_exist(tmp_path):
    _write_run(tmp_path / "plain", hc=False)
    paths = plot_lib.draw_plots(str(tmp_path / "plain"))
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    # No hyper-connection metrics: no Amax-gain figure.
    assert names == ["engram_gate.png", "loss.png", "moe_load.png"]
    for path in paths:
        assert path.startswith(str(tmp_path / "plain" / "plots"))
        _assert_png(path)


def test_command_line_compares_several_runs(tmp_path):
    _write_run(tmp_path / "a", hc=True)
    _write_run(tmp_path / "b", hc=True, offset=0.5)
    out = tmp_path / "compare"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram_jax.plot",
            f"--workdir={tmp_path / 'a'}",
            f"--workdir={tmp_path / 'b'}",
            f"--out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "engram_gate.png",
        "hc_amax_gain.png",
        "loss.png",
        "moe_load.png",
    ]
    for path in out.iterdir():
        _assert_png(path)
    with pytest.raises(ValueError, match="out_dir"):
        plot_lib.draw_plots([str(tmp_path / "a"), str(tmp_path / "b")])


def test_refresher_never_loses_the_last_request_and_swallows_failures(tmp_path):
    release = threading.Event()
    calls = []

    def slow_draw(workdir):
        calls.append(workdir)
        if len(calls) == 1:
            release.wait(timeout=30)  # the first drawing is still running ...
        if len(calls) == 2:
            raise RuntimeError("matplotlib broke")

    refresher = plot_lib.PlotRefresher("w", draw=slow_draw)
    refresher.refresh()
    refresher.refresh()  # ... so these two merge into one more drawing after it
    refresher.refresh()
    release.set()
    refresher.close()  # waits, then draws the final state; the failure was only logged
    assert calls == ["w", "w", "w"]
    disabled = plot_lib.PlotRefresher("w", enabled=False, draw=slow_draw)
    disabled.refresh()
    disabled.close()
    assert len(calls) == 3
