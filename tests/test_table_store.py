"""Tables built in row chunks (reproducible, sharding-independent) and tables kept on the host or on
disk for generation: identical greedy output, exact row files, and a row cache that reads each
missing row once."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax import generate as generate_lib
from engram_jax import sharding
from engram_jax import train as train_lib
from engram_jax.tables import fp8, initializers, memory_item, row_files
from tests.multidevice import run_with_devices
from tests.test_train import _small_config, _write_corpus


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """A workdir with one committed checkpoint of a freshly initialised two-Engram-layer model
    (no training needed: placements must agree on any weights)."""
    return _write_workdir(tmp_path_factory.mktemp("placements"))


@pytest.fixture(scope="module")
def fp8_workdir(tmp_path_factory) -> str:
    """The same with 32-wide table rows (FP8 rows keep one scale per 32 values)."""
    return _write_workdir(tmp_path_factory.mktemp("fp8_placements"), embed_per_ngram=64)


def _write_workdir(root, embed_per_ngram: int | None = None) -> str:
    corpus = str(root / "corpus.txt")
    _write_corpus(corpus)
    config = _small_config(corpus)
    config.model.engram.layer_ids = (0, 1)
    if embed_per_ngram:
        config.model.engram.embed_per_ngram = embed_per_ngram
    cfg = config_lib.validate(config)
    path = str(root / "work")
    os.makedirs(path)
    setup = train_lib.build_data(cfg, path)
    setup.tokenizer.save(os.path.join(path, train_lib.TOKENIZER_FILE))
    mesh = sharding.mesh_from_config(cfg.mesh)
    model = train_lib.Transformer(cfg.model, lookup_fn=sharding.table_lookup_fn(mesh))
    txs = train_lib.make_optimizers(cfg)[:2]
    state, _ = train_lib.create_train_state(model, cfg, txs, mesh)
    dense, memory = train_lib.checkpoint_items(state)
    with checkpoint_lib.CheckpointStore(os.path.join(path, "checkpoints")) as store:
        store.save(
            5,
            state=dense,
            memory=memory,
            metadata=train_lib._checkpoint_metadata(config, setup),
        )
    return path


def test_greedy_output_identical_on_device_host_and_disk(workdir):
    sampling = generate_lib.SamplingConfig(max_tokens=10, temperature=0.0)
    outputs = {}
    for placement in generate_lib.PLACEMENTS:
        with generate_lib.Generator(
            workdir, table_placement=placement, row_cache_mib=0.01
        ) as generator:
            prompt = np.asarray(generator.tokenizer.encode("the memory table maps").ids, np.int32)
            outputs[placement] = generator.generate_ids(prompt, sampling)
        if placement == "disk":
            cache = generator.rows.cache
            reads = sum(source.reads for source in cache.sources)
            assert reads == cache.requested - cache.hits > 0
            # A 10 KiB cache holds 160 rows of 16 floats: later tokens hit rows read earlier.
            assert cache.hits > 0 and cache.cached_bytes <= 0.01 * 2**20
            # Leaving the `with` closed the row files.
            with pytest.raises(ValueError, match="layer_0.rows: row file is closed"):
                cache.sources[0].read(np.arange(2))
    assert len(outputs["device"]) == 10
    assert outputs["host"] == outputs["device"]
    assert outputs["disk"] == outputs["device"]
    with open(os.path.join(workdir, generate_lib.ROW_DIR, "5", "layer_1.json")) as f:
        meta = json.load(f)
    assert meta["step"] == 5 and meta["source"] == "tables.layer_1.engram.table"


def test_fp8_greedy_output_identical_on_device_host_and_disk(fp8_workdir, workdir):
    """FP8 tables: every placement dequantizes the same packed rows (those of `fp8.encode` of the
    checkpoint table) and decodes the same tokens; the row file stores W + W/32 bytes per row."""
    sampling = generate_lib.SamplingConfig(max_tokens=10, temperature=0.0)
    memory_dir = os.path.join(fp8_workdir, "checkpoints", "5", "memory")
    table = row_files.load_host_table(
        row_files.open_checkpoint_table(memory_dir, ("layer_1", "engram", "table"))
    )
    outputs = {}
    for placement in generate_lib.PLACEMENTS:
        with generate_lib.Generator(
            fp8_workdir, table_placement=placement, row_cache_mib=0.01, table_dtype="fp8"
        ) as generator:
            prompt = np.asarray(generator.tokenizer.encode("the memory table maps").ids, np.int32)
            outputs[placement] = generator.generate_ids(prompt, sampling)
            if placement == "device":
                packed = np.asarray(generator.packed_tables[1])
            else:
                source = generator.rows.cache.sources[1]
                packed = source.read(np.arange(source.shape[0]))
            np.testing.assert_array_equal(packed, fp8.encode(table))
    assert len(outputs["device"]) == 10
    assert outputs["host"] == outputs["device"] == outputs["disk"]
    with open(os.path.join(fp8_workdir, generate_lib.ROW_DIR, "5", "layer_1.fp8.json")) as f:
        meta = json.load(f)
    assert meta["encoding"] == "fp8" and meta["shape"] == [table.shape[0], 33]
    assert meta["row_width"] == 32
    with pytest.raises(ValueError, match="row width 8 is not a positive multiple of 32"):
        generate_lib.Generator(workdir, table_dtype="fp8")


def test_row_files_served_without_the_checkpoint_tables(fp8_workdir, tmp_path):
    """A checkpoint whose `memory` item is gone (e.g. deleted after conversion to save disk) is
    served from its FP8 row files alone, with the same greedy output."""
    sampling = generate_lib.SamplingConfig(max_tokens=6, temperature=0.0)
    copy = str(tmp_path / "work")
    outputs = []
    for path in (fp8_workdir, copy):
        if path == copy:  # after the first run wrote the row files
            shutil.copytree(fp8_workdir, copy)
            shutil.rmtree(os.path.join(copy, "checkpoints", "5", "memory"))
        with generate_lib.Generator(path, table_placement="disk", table_dtype="fp8") as generator:
            prompt = np.asarray(generator.tokenizer.encode("the memory").ids, np.int32)
            outputs.append(generator.generate_ids(prompt, sampling))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6


def test_corrupted_row_file_is_refused_naming_it(workdir, tmp_path):
    """A same-size row file with one flipped byte is refused with the file and block named, before
    any of its rows reach the model; a fresh reader of an intact copy reads fine."""
    rows_dir = os.path.join(workdir, generate_lib.ROW_DIR, "5")
    generate_lib.Generator(workdir, table_placement="disk").close()
    for suffix in (".rows", ".crc", ".json"):
        with open(os.path.join(rows_dir, "layer_0" + suffix), "rb") as f:
            (tmp_path / ("layer_0" + suffix)).write_bytes(f.read())
    path = str(tmp_path / "layer_0.rows")
    intact = row_files.RowFile(path)
    row_bytes = intact.row_bytes
    expected = intact.read(np.arange(intact.shape[0]))
    intact.close()
    with open(path, "r+b") as f:
        f.seek(70 * row_bytes + 3)  # a byte of row 70: checksum block 1 (rows 64-127)
        byte = f.read(1)
        f.seek(70 * row_bytes + 3)
        f.write(bytes([byte[0] ^ 0x10]))
    reader = row_files.RowFile(path)
    np.testing.assert_array_equal(reader.read(np.arange(3)), expected[:3])  # block 0 is intact
    with pytest.raises(
        row_files.RowFileError, match=r"layer_0.rows: 1 block\(s\) fail .* block 1 "
    ):
        reader.read(np.array([2, 100]))
    with pytest.raises(row_files.RowFileError, match="corrupted"):
        row_files.RowFile(path).verify_all()
    reader.close()
    # Through generation: the disk placement refuses the corrupted file, it does not decode.
    live = os.path.join(rows_dir, "layer_0.rows")
    with open(live, "rb") as f:
        original = f.read()
    try:
        with open(live, "wb") as f:
            f.write(bytes(b ^ 0xFF for b in original))
        with generate_lib.Generator(workdir, table_placement="disk") as generator:
            prompt = np.asarray(generator.tokenizer.encode("the memory").ids, np.int32)
            with pytest.raises(row_files.RowFileError, match="layer_0.rows: .* corrupted"):
                generator.generate_ids(prompt, generate_lib.SamplingConfig(max_tokens=2))
    finally:
        with open(live, "wb") as f:
            f.write(original)


def test_stale_row_file_is_rebuilt(workdir, caplog):
    """A row file whose fingerprint is not the checkpoint table's (another checkpoint at this
    step) is rebuilt with a warning naming it; the rebuilt file holds the checkpoint's rows."""
    rows_dir = os.path.join(workdir, generate_lib.ROW_DIR, "5")
    generate_lib.Generator(workdir, table_placement="disk").close()
    meta_path = os.path.join(rows_dir, "layer_1.json")
    with open(meta_path) as f:
        meta = json.load(f)
    fingerprint = meta["fingerprint"]
    meta["fingerprint"] = "0" * 32
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with open(os.path.join(rows_dir, "layer_1.rows"), "r+b") as f:
        f.write(b"\0" * 64)  # stale rows (consistent with their own checksums or not)
    with caplog.at_level("WARNING"):
        generate_lib.Generator(workdir, table_placement="disk").close()
    assert any("layer_1.rows: row file of table 000" in r.getMessage() for r in caplog.records)
    reader = row_files.RowFile(os.path.join(rows_dir, "layer_1.rows"))
    assert reader.fingerprint == fingerprint
    memory_dir = os.path.join(workdir, "checkpoints", "5", "memory")
    table = row_files.load_host_table(
        row_files.open_checkpoint_table(memory_dir, ("layer_1", "engram", "table"))
    )
    reader.verify_all()
    np.testing.assert_array_equal(reader.read(np.arange(table.shape[0])), table)
    reader.close()


_RSS_SCRIPT = """
import sys
import numpy as np
from engram_jax.tables import row_files

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

path, capacity_mib = sys.argv[1], float(sys.argv[2])
reader = row_files.RowFile(path, read_threads=1)
order = np.random.default_rng(0).permutation(reader.shape[0])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS: the imports' peak is gone
base = status("VmRSS")
cache = row_files.RowCache([reader], int(capacity_mib * 2**20))
for start in range(0, order.size, 4096):
    cache.gather(0, order[start : start + 4096])  # every row once: all misses
print(status("VmHWM") - base, cache.cached_bytes)
"""


def test_row_cache_peak_rss_is_its_configured_size(tmp_path):
    """The cache's share of peak RSS (peak growth of a run with the cache minus that of the same
    run without one; both read every row of the file once, so they touch the same mapped pages)
    stays within 1.1x of its configured size, and the cache really fills."""
    rows = np.random.default_rng(1).standard_normal((196_608, 64)).astype(np.float32)  # 48 MiB
    writer = row_files.RowFileWriter(tmp_path, "t", rows.shape, np.float32, encoding="float")
    writer.append(rows)
    path = writer.commit()
    env = dict(os.environ)
    peaks = {}
    for capacity_mib in (0, 32):
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, path, str(capacity_mib)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout.split()
        peaks[capacity_mib], cached = int(out[0]), int(out[1])
    configured = 32 * 2**20
    assert cached > 0.99 * configured
    assert 0.9 * configured < peaks[32] - peaks[0] < 1.1 * configured


def test_row_file_equals_the_checkpoint_table(workdir):
    generator = generate_lib.Generator(workdir)
    generate_lib.Generator(workdir, table_placement="disk")  # writes the row files (once)
    restored = np.asarray(generator.variables["params"]["layer_1"]["engram"]["table"])
    row_file = row_files.RowFile(os.path.join(workdir, generate_lib.ROW_DIR, "5", "layer_1.rows"))
    np.testing.assert_array_equal(row_file.read(np.arange(restored.shape[0])), restored)
    memory_dir = os.path.join(workdir, "checkpoints", "5", "memory")
    array = row_files.open_checkpoint_table(memory_dir, ("layer_1", "engram", "table"))
    np.testing.assert_array_equal(row_files.load_host_table(array, block_rows=100), restored)
    with pytest.raises(FileNotFoundError, match="layer_7"):
        row_files.open_checkpoint_table(memory_dir, ("layer_7", "engram", "table"))


class _ReferenceLru:
    """Plain LRU per cache set (the cache's `set_of`, `ways` rows each), counting hits per
    request (unique rows per call): hits are used first, then misses inserted, in ascending order.
    """

    def __init__(self, cache: row_files.RowCache):
        self.cache, self.sets = cache, collections.defaultdict(collections.OrderedDict)
        self.ways = cache._ways

    def request(self, layer, ids) -> int:
        hits = 0
        unique = sorted(set(int(i) for i in np.asarray(ids).reshape(-1)))
        sets = self.cache.set_of(layer, np.asarray(unique, np.int64)).tolist()
        for row, s in zip(unique, sets, strict=True):
            if (layer, row) in self.sets[s]:
                hits += 1
                self.sets[s].move_to_end((layer, row))
        for row, s in zip(unique, sets, strict=True):
            if (layer, row) not in self.sets[s] and self.ways > 0:
                self.sets[s][(layer, row)] = True
                while len(self.sets[s]) > self.ways:
                    self.sets[s].popitem(last=False)
        return hits


def test_disk_reads_equal_unique_rows_minus_cache_hits(workdir):
    rows_dir = os.path.join(workdir, generate_lib.ROW_DIR, "5")
    if not os.path.exists(os.path.join(rows_dir, "layer_0.rows")):
        generate_lib.Generator(workdir, table_placement="disk")
    sources = [row_files.RowFile(os.path.join(rows_dir, f"layer_{i}.rows")) for i in (0, 1)]
    tables = [s.read(np.arange(s.shape[0])) for s in sources]
    # Rows spread over threads land in request order, as read on the calling thread.
    serial = row_files.RowFile(os.path.join(rows_dir, "layer_0.rows"), read_threads=1)
    ids = np.random.default_rng(5).integers(0, serial.shape[0], row_files.THREADED_READ_ROWS + 37)
    np.testing.assert_array_equal(sources[0].read(ids), serial.read(ids))
    np.testing.assert_array_equal(serial.read(ids), tables[0][ids])
    serial.close()
    with pytest.raises(ValueError, match="read_threads=0"):
        row_files.RowFile(os.path.join(rows_dir, "layer_0.rows"), read_threads=0)
    row_bytes = tables[0].shape[1] * 4
    for capacity_rows in (0, 7, 50):
        readers = [row_files.RowFile(os.path.join(rows_dir, f"layer_{i}.rows")) for i in (0, 1)]
        cache = row_files.RowCache(readers, capacity_rows * row_bytes)
        reference = _ReferenceLru(cache)
        rng = np.random.default_rng(capacity_rows)
        for _ in range(12):
            # [B=1, T=3, M=4] per layer, with repeats inside a step and across steps (few rows).
            ids = rng.integers(0, 40, (1, 2, 3, 4))
            for layer in (0, 1):
                before = readers[layer].reads
                rows = cache.gather(layer, ids[:, layer])
                unique = len(np.unique(ids[:, layer]))
                hits = reference.request(layer, ids[:, layer])
                assert readers[layer].reads - before == unique - hits
                np.testing.assert_array_equal(rows, tables[layer][ids[:, layer]])
        assert cache.cached_bytes <= capacity_rows * row_bytes
        # The threaded gatherer (layers read concurrently): same rows, same accounting.
        gatherer = row_files.RowGatherer(cache)
        ids = rng.integers(0, 60, (1, 2, 5, 4))
        rows = gatherer.gather(ids)
        for layer in (0, 1):
            np.testing.assert_array_equal(rows[:, layer], tables[layer][ids[:, layer]])
        assert sum(r.reads for r in readers) == cache.requested - cache.hits == cache.misses
        # A cleared cache (and a row file evicted from the page cache) reads every row again.
        cache.clear()
        assert cache.cached_bytes == 0
        for reader in readers:
            reader.evict_page_cache()
        before = readers[0].reads
        np.testing.assert_array_equal(gatherer.gather(ids)[:, 0], tables[0][ids[:, 0]])
        assert readers[0].reads - before == len(np.unique(ids[:, 0]))
        gatherer.close()


def test_bad_placement_and_cache_size(workdir):
    with pytest.raises(ValueError, match="table_placement"):
        generate_lib.Generator(workdir, table_placement="ssd")
    with pytest.raises(ValueError, match="row_cache_mib"):
        generate_lib.Generator(workdir, table_placement="disk", row_cache_mib=-1)


def test_chunked_init_is_reproducible_and_sharding_independent():
    key = jax.random.PRNGKey(3)
    whole = np.asarray(initializers.init_table(key, (1000, 16), chunk_rows=1000))
    np.testing.assert_array_equal(
        np.asarray(initializers.init_table(key, (1000, 16), chunk_rows=64)), whole
    )
    np.testing.assert_array_equal(
        initializers.init_host_table(key, (1000, 16), block_rows=300), whole
    )
    # Row r is std * normal(fold_in(key, r)): an independent per-row transcription.
    for r in (0, 517, 999):
        expected = 0.5 * jax.random.normal(jax.random.fold_in(key, r), (16,), jnp.float32)
        np.testing.assert_array_equal(
            np.asarray(initializers.init_table(key, (1000, 16), std=0.5))[r], np.asarray(expected)
        )
    assert abs(whole.mean()) < 0.05 and abs(whole.std() - 1.0) < 0.05
    code = """
        import json, jax, numpy as np
        from engram_jax.tables import initializers
        mesh = jax.make_mesh((4, 2), ("rows", "cols"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows", "cols"))
        table = initializers.init_table(jax.random.PRNGKey(3), (1000, 16), sharding=sharding,
                                      chunk_rows=64)
        print(json.dumps({"shard": list(table.addressable_shards[0].data.shape),
                          "values": np.asarray(table).tolist()}))
        """
    out = run_with_devices(8, code)
    assert out["shard"] == [250, 8]
    np.testing.assert_array_equal(np.asarray(out["values"], np.float32), whole)


def test_memory_item_round_trip_across_meshes_and_numpy_targets(tmp_path):
    """Saved from 8 devices (rows over 4, replicated over 2), restored on 1 device, into numpy
    in place, and opened without reading; an orbax-layout item still restores."""
    directory = str(tmp_path / "memory")
    code = f"""
        import json, jax, jax.numpy as jnp, numpy as np
        from etils import epath
        from engram_jax.tables import memory_item
        mesh = jax.make_mesh((4, 2), ("rows", "copies"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
        table = jax.device_put(jnp.arange(40 * 3, dtype=jnp.float32).reshape(40, 3), rows)
        tree = {{"tables": {{"t": table}}, "opt_state": (jnp.int32(7), {{"v": table * 2}})}}
        path = epath.Path({directory!r})
        path.mkdir()
        memory_item.save_memory(path, tree, block_rows=3)
        print(json.dumps(sorted(p.name for p in (path / "tables.t").iterdir())))
        """
    assert run_with_devices(8, code) == [f"shard_{a}-{a + 10}_0-3" for a in (0, 10, 20, 30)]
    expected = np.arange(120, dtype=np.float32).reshape(40, 3)
    directory = memory_item.epath.Path(directory)
    target = {
        "tables": {"t": jax.ShapeDtypeStruct((40, 3), jnp.float32)},
        "opt_state": (jax.ShapeDtypeStruct((), jnp.int32), {"v": np.zeros((40, 3), np.float32)}),
    }
    restored = memory_item.restore_memory(directory, target, block_rows=7)
    np.testing.assert_array_equal(np.asarray(restored["tables"]["t"]), expected)
    assert int(restored["opt_state"][0]) == 7
    assert restored["opt_state"][1]["v"] is target["opt_state"][1]["v"]  # filled in place
    np.testing.assert_array_equal(restored["opt_state"][1]["v"], 2 * expected)
    view = row_files.open_checkpoint_table(directory, ("t",))
    np.testing.assert_array_equal(row_files.load_host_table(view, block_rows=6), expected)
    bad = {"tables": {"t": jax.ShapeDtypeStruct((40, 3), jnp.float32)}}
    with pytest.raises(ValueError, match="saved only"):
        memory_item.restore_memory(directory, bad)
    tables = memory_item.restore_memory(directory, bad, partial=True)["tables"]["t"]
    np.testing.assert_array_equal(np.asarray(tables), expected)

    legacy = tmp_path / "legacy"
    ocp = memory_item.ocp
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(legacy, {"t": expected})
    handler = memory_item.MemoryHandler()
    out = handler.restore(legacy, memory_item.MemoryRestore({"t": np.zeros((40, 3))}))
    np.testing.assert_array_equal(np.asarray(out["t"]), expected)


class _RecordingGatherer(row_files.RowGatherer):
    """A real RowGatherer that also logs when rows are submitted and when they are awaited."""

    def __init__(self, cache, events, threads):
        super().__init__(cache, threads=threads)
        self.events = events

    def submit(self, flat_ids):
        self.events.append("submit rows")
        future = super().submit(flat_ids)
        events = self.events

        class _Logged:
            def result(self):
                events.append("await rows")
                return future.result()

        return _Logged()


@pytest.mark.parametrize("threads", [True, False], ids=["disk-threads", "host-inline"])
def test_split_decode_step_equals_the_unsplit_step_and_submits_rows_first(threads):
    """configs/tiny.py (Engram layers 1 and 3, mHC): prefix [0, 1) then suffix [1, 4) on rows
    gathered on the host gives the single step's logits and cache bit for bit, for the prompt and
    for the next token; the rows of every Engram layer are submitted before the prefix is
    dispatched and awaited only after it. Unsplit (`split=False`), the rows are awaited before the
    one program, with the same result."""
    config = config_lib.load_config_file(
        os.path.join(os.path.dirname(generate_lib.__file__), "configs", "tiny.py")
    )
    model_config = config_lib.validate(config).model
    e = model_config.engram
    sizes = [generate_lib.engram_table_sizes(model_config)[layer] for layer in e.layer_ids]
    offsets = np.stack([generate_lib.head_offsets(s) for s in sizes])  # [L_e, M]
    rng = np.random.default_rng(0)
    tables = [
        rng.standard_normal((sum(s), e.row_width)).astype(np.float32) for s in sizes
    ]  # one [R, W] table per Engram layer
    events = []
    gatherer = _RecordingGatherer(
        row_files.RowCache([row_files.HostRows(t) for t in tables], 0), events, threads
    )
    # The default splits where the overlap can pay: row files (threads) on any backend, host rows
    # only off the CPU backend.
    default = generate_lib.DecodeStep(model_config, model_config.vocab_size, gatherer, offsets)
    assert default.split == (threads or jax.default_backend() != "cpu")
    step = generate_lib.DecodeStep(
        model_config, model_config.vocab_size, gatherer, offsets, split=True
    )
    assert step.split_layer == 1
    prefix, suffix = step.prefix, step.suffix
    unsplit = generate_lib.DecodeStep(
        model_config, model_config.vocab_size, gatherer, offsets, split=False
    )
    # The same compiled program as the split step's reference (one compile less).
    unsplit.full = _logged(events, "dispatch step", step.full)

    step.prefix = _logged(events, "dispatch prefix", prefix)
    step.suffix = _logged(events, "dispatch suffix", suffix)

    prompt, total = 5, 6
    tokens = rng.integers(0, model_config.vocab_size, (1, total)).astype(np.int32)
    hash_ids = np.stack(
        [rng.integers(0, np.asarray(s), (1, total, len(s))) for s in sizes], axis=1
    ).astype(np.int32)  # [1, L_e, T, M]
    rows = np.stack(
        [tables[i][step.flat_ids(hash_ids)[:, i]] for i in range(len(sizes))], axis=1
    )  # [1, L_e, T, M, W]
    variables = _rows_only_variables(model_config, rows[:, :, :1])
    full_cache, split_cache, unsplit_cache = (step.empty_cache(total) for _ in range(3))
    for chunk in (slice(0, prompt), slice(prompt, total)):
        positions = np.arange(total, dtype=np.int32)[None, chunk]
        full_logits, full_cache = step.full(
            variables, full_cache, tokens[:, chunk], positions, None, rows[:, :, chunk]
        )
        events.clear()
        split_logits, split_cache = step(
            variables, split_cache, tokens[:, chunk], positions, hash_ids[:, :, chunk]
        )
        assert events == ["submit rows", "dispatch prefix", "await rows", "dispatch suffix"]
        events.clear()
        unsplit_logits, unsplit_cache = unsplit(
            variables, unsplit_cache, tokens[:, chunk], positions, hash_ids[:, :, chunk]
        )
        assert events == ["submit rows", "await rows", "dispatch step"]
        for logits in (split_logits, unsplit_logits):
            np.testing.assert_array_equal(np.asarray(logits), np.asarray(full_logits))
        for cache in (split_cache, unsplit_cache):
            for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(full_cache), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    gatherer.close()


def _logged(events, name, fn):
    """`fn`, appending `name` to `events` at each call."""

    def call(*args):
        events.append(name)
        return fn(*args)

    return call


def _rows_only_variables(model_config, rows):
    """Variables (params, MoE biases) of a model that reads pre-gathered rows (no tables)."""
    model = train_lib.Transformer(model_config)
    tokens = jnp.zeros(rows.shape[:1] + rows.shape[2:3], jnp.int32)  # [B, T]
    return dict(model.init(jax.random.PRNGKey(3), tokens, engram_rows=jnp.asarray(rows)))
