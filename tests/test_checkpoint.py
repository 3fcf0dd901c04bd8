"""Tests for engram_jax.checkpoint on real orbax directories under tmp_path."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engram_jax import checkpoint as ckpt
from engram_jax.checkpoint import CheckpointMismatchError, CheckpointReadError, CheckpointStore
from tests.multidevice import run_with_devices

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's unfinished-step directory suffix


@flax.struct.dataclass
class _State:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def _make_trees(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "kernel": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
        "scale": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16),
        "positions": jnp.asarray(rng.integers(-5, 5, size=(6,)), jnp.int32),
    }
    opt = optax.adam(1e-3)
    float_params = {k: v for k, v in params.items() if k != "positions"}
    state = _State(step=jnp.int32(7), params=params, opt_state=opt.init(float_params))
    table = {"layers_1": {"engram": {"table": jnp.asarray(rng.normal(size=(16, 4)), jnp.bfloat16)}}}
    memory = {"tables": table, "opt_state": opt.init(table)}
    return state, memory


def _abstract_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract(tree):
    sharding = _abstract_sharding()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


META = {"config": {"model": {"num_layers": 4, "engram": {"layer_ids": [1, 3]}}}, "fp": "abc"}


def test_round_trip_all_items(tmp_path):
    state, memory = _make_trees()
    data_state = {"next_index": 42, "epoch": 1, "shard": "x"}
    with CheckpointStore(tmp_path / "ckpt") as store:
        store.save(10, state=state, memory=memory, data_state=data_state, metadata=META)
        store.wait_until_finished()
        assert store.all_steps() == [10]
        out = store.restore(abstract_state=_abstract(state), abstract_memory=_abstract(memory))
    assert set(out) == {"state", "memory", "data", "meta"}
    assert isinstance(out["state"], _State)
    _assert_bitwise_equal(out["state"], state)
    _assert_bitwise_equal(out["memory"], memory)
    assert out["state"].params["scale"].dtype == jnp.bfloat16
    assert out["state"].params["positions"].dtype == jnp.int32
    assert out["data"] == data_state
    assert out["meta"]["config"] == META["config"]
    assert out["meta"]["_checkpoint"]["process_count"] == 1
    assert out["meta"]["_checkpoint"]["items"] == ["state", "memory", "data", "meta"]
    assert "process_0-of-1.json" in os.listdir(tmp_path / "ckpt" / "10" / "data")


def test_restore_single_items_and_empty_memory(tmp_path):
    state, memory = _make_trees(1)
    store = CheckpointStore(tmp_path, max_to_keep=None)
    store.save(1, state=state, memory=memory, metadata=META)
    store.save(2, state=state, memory={}, metadata=META)  # no tables, no data state
    only_memory = store.restore(1, abstract_memory=_abstract(memory), items=("memory",))
    assert set(only_memory) == {"memory"}
    _assert_bitwise_equal(only_memory["memory"], memory)
    only_state = store.restore(1, abstract_state=_abstract(state), items=("state",))
    assert set(only_state) == {"state"}
    _assert_bitwise_equal(only_state["state"], state)
    latest = store.restore(abstract_state=_abstract(state), items=("state", "memory", "data"))
    assert latest["memory"] == {} and latest["data"] is None
    _assert_bitwise_equal(latest["state"], state)
    assert not (tmp_path / "2" / "memory").exists()
    with pytest.raises(ValueError, match="items="):
        store.restore(items=("params",))
    store.close()


def test_strict_structure_on_restore(tmp_path):
    state, memory = _make_trees(2)
    store = CheckpointStore(tmp_path)
    store.save(3, state=state, memory=memory, metadata=META)
    bigger = dict(memory["tables"]["layers_1"], extra=jnp.zeros((2,), jnp.float32))
    wrong_memory = {**memory, "tables": {"layers_1": bigger}}
    with pytest.raises(CheckpointReadError, match=r"'memory' of checkpoint step 3") as err:
        store.restore(abstract_memory=_abstract(wrong_memory), items=("memory",))
    assert str(tmp_path / "3" / "memory") in str(err.value)
    store.close()


def test_keep_last_n(tmp_path):
    state, memory = _make_trees(3)
    store = CheckpointStore(tmp_path, max_to_keep=2)
    for step in (5, 10, 15):
        store.save(step, state=state, memory=memory, metadata=META)
    assert store.all_steps() == [10, 15]
    assert store.latest_step() == 15
    assert sorted(os.listdir(tmp_path)) == ["10", "15"]
    store.close()
    # A reopened store sees the same steps.
    assert CheckpointStore(tmp_path, create=False).all_steps() == [10, 15]


def test_old_checkpoint_deleted_only_after_new_commit(tmp_path):
    small = {"w": np.arange(6, dtype=np.float32)}
    big = {"w": np.random.default_rng(0).standard_normal(12_500_000, dtype=np.float32)}  # 50 MB
    store = CheckpointStore(tmp_path, max_to_keep=1)
    store.save(1, state=small, memory={}, metadata={})
    store.wait_until_finished()
    store.save(2, state=big, memory={}, metadata={})
    # While step 2 is in flight, step 1 must exist unless step 2 has committed. Check 1 before 2:
    # if 1 is already gone, 2 committed before the deletion started and is on disk.
    observations = []
    for _ in range(200_000):  # bounded busy poll: ~3 stat calls per iteration
        has_1 = (tmp_path / "1").exists()
        has_2 = (tmp_path / "2").exists()
        observations.append((has_1, has_2))
        assert has_1 or has_2, "no committed checkpoint on disk during a save"
        if has_2 and not has_1:
            break
    assert observations[0] == (True, False), "precondition: step 2 observed in flight"
    store.wait_until_finished()
    assert store.all_steps() == [2]
    restored = store.restore(abstract_state=_abstract(big), items=("state",))["state"]
    _assert_bitwise_equal(restored, big)
    store.close()


def test_metadata_and_check_compatible(tmp_path):
    state, memory = _make_trees(4)
    with CheckpointStore(tmp_path) as store:
        store.save(1, state=state, memory=memory, metadata=META)
        saved = store.read_metadata()
    assert saved["fp"] == "abc" and saved["_checkpoint"]["step"] == 1
    # Tuples equal lists after the JSON round trip.
    same = {"config": {"model": {"num_layers": 4, "engram": {"layer_ids": (1, 3)}}}, "fp": "abc"}
    ckpt.check_compatible(saved, same, keys_must_match=("config.model", "fp"))
    changed = {"config": {"model": {"num_layers": 6, "engram": {"layer_ids": (1, 3)}}}, "fp": "xyz"}
    with pytest.raises(CheckpointMismatchError) as err:
        ckpt.check_compatible(saved, changed, keys_must_match=("config", "fp"))
    message = str(err.value)
    assert "config.model.num_layers: checkpoint 4, config 6" in message
    assert "fp: checkpoint 'abc', config 'xyz'" in message
    assert "layer_ids" not in message
    # A key only on one side is a difference too; keys not listed are ignored.
    with pytest.raises(
        CheckpointMismatchError, match=r"config.model.new_key: checkpoint <missing>"
    ):
        ckpt.check_compatible(
            saved,
            {"config": {"model": {**same["config"]["model"], "new_key": 1}}, "fp": "other"},
            keys_must_match=("config.model",),
        )
    # Keys that may differ are returned, not refused.
    remat = {"config": {"model": {**same["config"]["model"], "remat": True}}, "fp": "abc"}
    allowed = ckpt.check_compatible(
        saved, remat, keys_must_match=("config", "fp"), may_differ=("config.model.remat",)
    )
    assert allowed == ["config.model.remat: checkpoint <missing>, config True"]


def test_max_to_keep_is_enforced_for_leftovers_and_unreadable_steps_are_set_aside(tmp_path):
    state, memory = _make_trees()
    with CheckpointStore(tmp_path / "c", max_to_keep=None) as store:
        for step in (1, 2, 3):
            store.save(step, state=state, memory=memory, metadata=META)
    with CheckpointStore(tmp_path / "c", max_to_keep=2) as store:
        assert store.enforce_max_to_keep() == [1]
        assert store.all_steps() == [2, 3]
        where = store.set_aside(3)
        assert store.all_steps() == [2]
    assert where == tmp_path / "c.unreadable-3"
    assert (where / "meta").is_dir()


def test_missing_directory_and_step(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        CheckpointStore(tmp_path / "does_not_exist", create=False)
    store = CheckpointStore(tmp_path / "empty")
    assert store.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no committed checkpoint in .*empty"):
        store.restore()
    state, memory = _make_trees(5)
    store.save(4, state=state, memory=memory, metadata=META)
    with pytest.raises(FileNotFoundError, match=r"step 9 not found at .*empty/9.*\[4\]"):
        store.restore(9)
    store.close()


def test_corrupt_item_names_path_step_item(tmp_path):
    state, memory = _make_trees(6)
    with CheckpointStore(tmp_path) as store:
        store.save(8, state=state, memory=memory, metadata=META)
    item_dir = tmp_path / "8" / "state"
    corrupted = 0
    for root, _, files in os.walk(item_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
            corrupted += 1
    assert corrupted > 0
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointReadError) as err:
        store.restore(8, abstract_state=_abstract(state), items=("state",))
    message = str(err.value)
    assert "'state'" in message and "step 8" in message and str(item_dir) in message
    # The other items of the same step are still readable.
    restored = store.restore(8, abstract_memory=_abstract(memory), items=("memory",))
    _assert_bitwise_equal(restored["memory"], memory)
    store.close()


def test_existing_step_is_never_overwritten(tmp_path):
    state, memory = _make_trees(7)
    other_state, _ = _make_trees(8)
    first = CheckpointStore(tmp_path)  # opened before the step exists
    with CheckpointStore(tmp_path) as second:
        second.save(5, state=state, memory=memory, metadata=META)
        with pytest.raises(FileExistsError, match=r"step 5 already exists"):
            second.save(5, state=other_state, memory=memory, metadata=META)
    # `first`'s cached step list lacks step 5; the disk check still refuses (plain orbax would
    # delete the directory and write over it).
    with pytest.raises(FileExistsError, match=r"step 5 already exists"):
        first.save(5, state=other_state, memory=memory, metadata=META)
    first.close()
    restored = CheckpointStore(tmp_path).restore(abstract_state=_abstract(state), items=("state",))
    _assert_bitwise_equal(restored["state"], state)


def test_bad_save_arguments_fail_in_caller(tmp_path):
    state, memory = _make_trees(9)
    store = CheckpointStore(tmp_path)
    with pytest.raises(TypeError, match="metadata is not JSON-serialisable"):
        store.save(1, state=state, memory=memory, metadata={"x": object()})
    with pytest.raises(TypeError, match="data_state is not JSON-serialisable"):
        store.save(1, state=state, memory=memory, data_state={"x": {1, 2}}, metadata={})
    with pytest.raises(ValueError, match="reserved"):
        store.save(1, state=state, memory=memory, metadata={"_checkpoint": 1})
    with pytest.raises(ValueError, match="step=-1"):
        store.save(-1, state=state, memory=memory, metadata={})
    assert store.all_steps() == []
    store.close()


def test_async_error_surfaces_and_keeps_previous(tmp_path):
    # A 1 ms deadline for the background commit of a 50 MB write: the background thread fails
    # after `save` has returned, and the error must reach the caller at the next wait.
    small = {"w": np.arange(6, dtype=np.float32)}
    big = {"w": np.random.default_rng(1).standard_normal(12_500_000, dtype=np.float32)}
    good = CheckpointStore(tmp_path, max_to_keep=1)
    good.save(1, state=small, memory={}, metadata={})
    good.close()
    store = CheckpointStore(tmp_path, max_to_keep=1, async_timeout_s=1e-3)
    store.save(2, state=big, memory={}, metadata={})  # returns: the failure is in the background
    with pytest.raises(ckpt.CheckpointWriteError, match=r"step 2 at .*2.*TimeoutError"):
        store.wait_until_finished()
    store.wait_until_finished()  # raised once, not forever
    assert store.all_steps() == [1]  # the failed step is not listed; step 1 was not deleted
    store.close()
    reopened = CheckpointStore(tmp_path)
    assert reopened.all_steps() == [1]
    _assert_bitwise_equal(
        reopened.restore(abstract_state=_abstract(small), items=("state",))["state"], small
    )
    reopened.close()


_KILL_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from engram_jax.checkpoint import CheckpointStore

    store = CheckpointStore(sys.argv[1], max_to_keep=3)
    store.save(1, state={"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, memory={},
               data_state={"index": 1}, metadata={"run": "kill"})
    store.wait_until_finished()
    big = np.random.default_rng(0).standard_normal(12_500_000, dtype=np.float32)  # 50 MB
    store.save(2, state={"w": big}, memory={}, data_state={"index": 2}, metadata={"run": "kill"})
    os.kill(os.getpid(), signal.SIGKILL)  # mid-save: the background commit has not finished
    """
)


def test_kill_during_async_save(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", _KILL_CHILD, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert (tmp_path / f"2{TMP_SUFFIX}").exists(), "precondition: a partial step-2 directory"
    assert not (tmp_path / "2").exists()

    store = CheckpointStore(tmp_path)
    assert store.all_steps() == [1]
    target = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32)}
    out = store.restore(abstract_state=target)
    np.testing.assert_array_equal(np.asarray(out["state"]["w"]), np.arange(12).reshape(3, 4))
    assert out["data"] == {"index": 1}
    # Step 2 can be saved again; the partial directory is cleaned up / replaced.
    store.save(2, state={"w": np.ones((3, 4), np.float32)}, memory={}, metadata={})
    store.wait_until_finished()
    assert store.all_steps() == [1, 2]
    assert not (tmp_path / f"2{TMP_SUFFIX}").exists()
    out = store.restore(2, abstract_state=target, items=("state",))
    np.testing.assert_array_equal(np.asarray(out["state"]["w"]), np.ones((3, 4)))
    store.close()


def test_restore_onto_other_mesh(tmp_path):
    # Saved with the table's rows sharded over 4 devices; restored sharded over 2 devices and on one
    # device, through abstract targets carrying the new shardings: any mesh restores.
    code = f"""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from engram_jax.checkpoint import CheckpointStore

    devices = np.array(jax.devices())
    mesh4 = jax.sharding.Mesh(devices, ("rows",))
    table = np.arange(32 * 6, dtype=np.float32).reshape(32, 6)
    sharded = jax.device_put(table, NamedSharding(mesh4, P("rows", None)))
    store = CheckpointStore({str(tmp_path)!r})
    store.save(1, state={{"step": np.int32(1)}}, memory={{"table": sharded}}, metadata={{}})
    store.wait_until_finished()

    results = {{}}
    mesh2 = jax.sharding.Mesh(devices[:2], ("rows",))
    for name, sharding in [
        ("mesh2", NamedSharding(mesh2, P("rows", None))),
        ("single", jax.sharding.SingleDeviceSharding(devices[3])),
    ]:
        target = {{"table": jax.ShapeDtypeStruct((32, 6), jnp.float32, sharding=sharding)}}
        out = store.restore(abstract_memory=target, items=("memory",))["memory"]["table"]
        results[name] = {{
            "equal": bool(np.array_equal(np.asarray(out), table)),
            "num_shards": len(out.addressable_shards),
            "shard_shape": list(out.addressable_shards[0].data.shape),
        }}
    store.close()
    print(json.dumps(results))
    """
    results = run_with_devices(4, code)
    assert results["mesh2"] == {"equal": True, "num_shards": 2, "shard_shape": [16, 6]}
    assert results["single"] == {"equal": True, "num_shards": 1, "shard_shape": [32, 6]}


_TWO_PROCESS_CHILD = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    pid, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid,
        initialization_timeout=60,
    )
    from engram_jax.checkpoint import CheckpointStore

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("rows",))
    local = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)[pid * 4 : (pid + 1) * 4]
    table = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("rows", None)), local, (8, 3)
    )
    store = CheckpointStore(root)
    store.save(1, state={"step": np.int32(1)}, memory={"table": table},
               data_state={"process": pid}, metadata={"run": "two"})
    store.close()
    """
)


def test_two_processes_save_one_restores(tmp_path):
    # Two jax processes (one CPU device each) write one checkpoint: each its half of the table and
    # its own iterator state. A single process then restores the table; the iterator states, saved
    # by two processes, are refused with a clear error.
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS_CHILD, str(pid), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    for child in children:
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr[-3000:]
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
        os.listdir(tmp_path / "1" / "data")
    )

    store = CheckpointStore(tmp_path)
    target = {"table": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=_abstract_sharding())}
    out = store.restore(abstract_memory=target, items=("memory", "meta"))
    np.testing.assert_array_equal(np.asarray(out["memory"]["table"]), np.arange(24).reshape(8, 3))
    assert out["meta"]["_checkpoint"]["process_count"] == 2
    with pytest.raises(CheckpointMismatchError, match="saved by 2 processes, this run has 1"):
        store.restore(items=("data",))
    store.close()


def test_gs_store_moves_an_unreadable_step_aside_byte_for_byte(tmp_path):
    """The same on a bucket of a local GCS emulator (object stores move by copy and delete)."""
    from engram_jax import storage
    from tests.gcs_emulator import gcs_emulator

    state, memory = _make_trees()
    with gcs_emulator() as bucket, CheckpointStore(f"{bucket}/c", max_to_keep=1) as store:
        for step in (1, 2):
            store.save(step, state=state, memory=memory, metadata=META)
        store.wait_until_finished()

        def files(root):
            return {p[len(str(root)) :]: storage.read_bytes(p) for p in storage.walk_files(root)}

        before = files(f"{bucket}/c/2")
        where = store.set_aside(2)
        assert str(where) == f"{bucket}/c.unreadable-2"
        assert files(where) == before and store.all_steps() == []
