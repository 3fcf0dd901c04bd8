"""Tests for engram_jax.metrics: JSON-lines/TensorBoard writer thread and progress display."""

import glob
import io
import json
import logging
import math
import os
import re
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from engram_jax import metrics as metrics_lib
from engram_jax.metrics import MetricsWriter, Progress, read_metrics


def _crc32c(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_tfrecords(path: str) -> list[bytes]:
    """TFRecord framing: u64 length, u32 masked crc(length), payload, u32 masked crc(payload)."""
    with open(path, "rb") as f:
        blob = f.read()
    records, offset = [], 0
    while offset < len(blob):
        header = blob[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", blob[offset + 8 : offset + 12])
        assert length_crc == _masked_crc(header)
        payload = blob[offset + 12 : offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", blob[offset + 12 + length : offset + 16 + length])
        assert payload_crc == _masked_crc(payload)
        records.append(payload)
        offset += 16 + length
    return records


def _tensorboard_scalars(workdir) -> dict[tuple[str, int], float]:
    files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert len(files) == 1, files
    scalars = {}
    for record in _read_tfrecords(files[0]):
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(
            1, {"loss": 2.5, "lr": np.float32(1e-3), "moe": {"load_max": jnp.float32(1.25)}}
        )
        writer.write(2, {"loss": jnp.array([1.5]), "tokens": 4096, "grad_norm": math.nan})
        writer.flush()
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2  # on disk after flush, before close
    rows = [json.loads(line) for line in lines]  # strict JSON: NaN was written as null
    assert rows[0] == {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3), "moe/load_max": 1.25}
    assert rows[1] == {"step": 2, "loss": 1.5, "tokens": 4096.0, "grad_norm": None}
    read_back = read_metrics(tmp_path)
    assert math.isnan(read_back[1]["grad_norm"]) and read_back[0]["moe/load_max"] == 1.25

    scalars = _tensorboard_scalars(tmp_path)
    assert scalars[("loss", 1)] == 2.5 and scalars[("loss", 2)] == 1.5
    assert scalars[("moe/load_max", 1)] == 1.25
    assert math.isnan(scalars[("grad_norm", 2)])

    # A resumed run appends.
    with MetricsWriter(tmp_path, enabled=True, use_tensorboard=False) as writer:
        writer.write(3, {"loss": 1.0})
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]

    # A run resumed from step 1 drops the rows past it (a killed run wrote them, this one
    # writes them again) and tells TensorBoard to discard those steps' events.
    with MetricsWriter(tmp_path, enabled=True, resume_step=1) as writer:
        assert [row["step"] for row in read_metrics(tmp_path)] == [1]
        writer.write(2, {"loss": 0.5})
    assert [(row["step"], row["loss"]) for row in read_metrics(tmp_path)] == [(1, 2.5), (2, 0.5)]
    purges = []
    for name in os.listdir(tmp_path / "tensorboard"):
        for record in _read_tfrecords(str(tmp_path / "tensorboard" / name)):
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                purges.append(event.step)
    assert purges == [2]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "run", enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.flush()
    writer.close()
    assert not (tmp_path / "run").exists()
    assert not writer.enabled


def test_rejects_non_scalars_in_caller(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, use_tensorboard=False) as writer:
        with pytest.raises(TypeError, match=r"metrics\['hist'\].*shape \(3,\)"):
            writer.write(1, {"hist": np.zeros(3)})
        with pytest.raises(TypeError, match="reserved"):
            writer.write(1, {"step": 1})
    assert read_metrics(tmp_path) == []


def test_writer_thread_error_is_reraised(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, use_tensorboard=False)
    writer.write(1, {"loss": 1.0})
    writer.flush()
    # Closing the file under the thread makes its next write fail inside the thread.
    writer._file.close()
    writer.write(2, {"loss": 2.0})
    with pytest.raises(ValueError, match="closed file"):
        writer.close()
    writer.close()  # raised once


_PROGRESS_LINE = re.compile(
    r"^step (\d+)/100 \| loss (\d\.\d{4}) \| tok/s ([\d.]+k?) \| lr (\d\.\d\de-\d\d) "
    r"\| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$"
)


def _step_metrics(step: int) -> dict[str, float]:
    # As train.py reports them: many metrics, of which the line shows three.
    return {
        "train_loss": 1.0 / step,
        "learning_rate": 3e-4,
        "grad_norm": 0.5,
        "engram_gate_mean/layer_0": 0.5,
        "tokens_per_second": 12345.0,
        "mfu": 0.1,
    }


def test_progress_log_lines_without_tty(caplog):
    stream = io.StringIO()  # not a TTY: log mode
    progress = Progress(
        100, enabled=True, initial_step=10, log_every=20, tokens_per_step=512, stream=stream
    )
    with caplog.at_level(logging.INFO, logger=metrics_lib.__name__):
        for step in range(11, 101):
            progress.update(step, _step_metrics(step))
        evaluation = {
            "eval_loss": 3.14159,
            "eval_perplexity": 23.1406,
            "eval_bits_per_byte": 1.23456,
            "hc_composite_forward_gain": 1.0000002,
            "hc_composite_backward_gain": 1.04519,
            "hc_mixing_entropy": 0.0175,  # metrics.jsonl only
        }
        progress.log_eval(100, evaluation)
        progress.close()
    lines = [r.getMessage() for r in caplog.records if r.name == metrics_lib.__name__]
    *step_lines, eval_line = lines
    matches = [_PROGRESS_LINE.match(line) for line in step_lines]
    assert all(matches), step_lines
    assert [int(m.group(1)) for m in matches] == [20, 40, 60, 80, 100]
    assert matches[0].group(2) == "0.0500"
    assert matches[0].group(3) == "12.3k"  # the metrics' tokens_per_second, nothing else
    assert matches[0].group(4) == "3.00e-04"
    assert eval_line == (
        "eval step 100 | loss 3.142 | perplexity 23.14 | bits/byte 1.235 | amax fwd 1 "
        "| amax bwd 1.045"
    )
    assert stream.getvalue() == ""


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_with_log_records_above_it():
    stream = _FakeTerminal()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        progress = Progress(50, enabled=True, tokens_per_step=512, stream=stream)
        for step in range(1, 51):
            metrics = _step_metrics(step)
            if step % 10 and step > 1:  # as train.py: tokens_per_second only at log steps
                del metrics["tokens_per_second"]
            progress.update(step, metrics)
            if step == 25:
                logging.getLogger("engram_jax.some_module").warning("a log record")
                assert handler.stream is not stream  # routed through tqdm.write while open
        progress.close()
        assert handler.stream is stream
    finally:
        root.removeHandler(handler)
    output = stream.getvalue()
    # tqdm redraws with carriage returns; a record must be a line of its own, never mid-bar.
    pieces = re.split(r"[\r\n]", output)
    assert "a log record" in pieces
    final = [p for p in pieces if "50/50" in p][-1]
    assert final.endswith("loss 0.0200, tok/s 12.3k, lr 3.00e-04]"), final
    assert "grad_norm" not in output and "mfu" not in output
    # Between log steps the bar keeps the caller's last tokens/s, never its own estimate.
    assert {m for m in re.findall(r"tok/s ([^,]+),", output)} == {"12.3k"}
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", final), final  # elapsed<ETA from the bar


def test_progress_bar_opens_at_the_first_update_so_compilation_is_not_in_its_eta():
    """The first step compiles; a bar opened before it would count that minute in its rate and
    show an ETA of hours. Nothing is drawn until the first update, which the bar counts as
    already done, so its clock starts there."""
    stream = io.StringIO()
    progress = Progress(50, enabled=True, stream=stream, use_tqdm=True, initial_step=10)
    assert stream.getvalue() == ""  # during compilation: no bar, no clock running
    progress.update(11, {"loss": 2.0})
    assert progress._bar is not None and progress._bar.n == 11
    assert progress._bar.format_dict["initial"] == 11  # tqdm's rate counts from here
    progress.update(12, {"loss": 2.0})
    assert progress._bar.n == 12
    progress.close()


def test_progress_tqdm_and_disabled():
    stream = io.StringIO()
    progress = Progress(50, enabled=True, stream=stream, use_tqdm=True)
    for step in range(1, 51):
        progress.update(step, {"loss": 2.0})
    progress.close()
    assert "50/50" in stream.getvalue()
    quiet = io.StringIO()
    progress = Progress(50, enabled=False, stream=quiet, use_tqdm=True)
    progress.update(1, {"loss": 2.0})
    progress.close()
    assert quiet.getvalue() == ""
