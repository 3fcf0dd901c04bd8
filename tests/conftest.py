"""Suite-wide settings: strict rank promotion, a persistent compilation cache, and which tests
the fast subset (`pytest -m "not slow"`) leaves out.

Several tests compile the same small programs (a training run and its resumed twin, subprocesses
that rebuild the model); the on-disk cache lets each program compile once per machine.
"""

import os
import tempfile

import jax
import pytest

_CACHE_DIR = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "engram_jax_test_xla_cache")
)
# Subprocesses started by the tests inherit these through the environment.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# The fast subset leaves out whole end-to-end modules (training runs, subprocess programs, wheel and
# notebook builds, the experiment sweeps) and the tests below, each above ~5 s on 2 CPU cores
# (most compile several model variants). Listed here rather than decorated in place so that the
# split is one table; a name is a prefix of the test's node id (parametrisations included).
SLOW_MODULES = (
    "test_bench.py",
    "test_experiments.py",
    "test_host_memory_tables_train.py",
    "test_memory_variants_experiment.py",
    "test_memory_variants_train.py",
    "test_notebook.py",
    "test_packaging.py",
    "test_preemption.py",
    "test_readme.py",
    "test_residual_variants.py",
    "test_train.py",
    "test_variant_configs.py",
)
SLOW_TESTS = (
    "test_checkpoint.py::test_two_processes_save_one_restores",
    "test_configs.py::test_config_builds_abstractly",
    "test_corpus.py::test_stream_pipeline_resumes_exactly[{'worker_count': 2}]",
    "test_data.py::test_iterator_state_roundtrip_with_workers",
    "test_engram.py::test_row_sharded_lookup_on_8_devices",
    "test_mhc.py::test_amax_gain_over_depth_hc_grows_mhc_stays_at_one",
    "test_model.py::test_bfloat16_close_to_float32",
    "test_model.py::test_cached_decoding_matches_full_forward",
    "test_model.py::test_hc_kinds_build_and_run",
    "test_model.py::test_mixing_matrices_in_depth_order",
    "test_model.py::test_nnx_bridge_matches_linen",
    "test_model.py::test_remat_same_loss_and_gradients",
    "test_model.py::test_scan_layers_matches_unscanned",
    "test_moe.py::test_bf16_close_to_f32",
    "test_moe.py::test_bias_update_balances_skewed_router",
    "test_moe.py::test_capacity_padding_takes_no_slot",
    "test_moe.py::test_default_dispatch_is_causal_under_skewed_router",
    "test_moe.py::test_dropless_rows_do_not_depend_on_their_place_in_sorted_order",
    "test_moe.py::test_gradients_and_balance_loss",
    "test_moe.py::test_mask_keeps_padding_out_of_load_balance_loss_and_bias_update",
    "test_moe.py::test_moe_matches_numpy_reference_with_bias[ragged]",
    "test_moe.py::test_param_shapes",
    "test_moe.py::test_tiny_full_forward_loss_equals_cached_decoding",
    "test_sparse.py::test_host_placement_matches_device_placement_over_ten_steps",
    "test_sparse.py::test_sparse_sgd_equals_dense_sgd_exactly",
    "test_table_store.py::test_greedy_output_identical_on_device_host_and_disk",
    "test_table_store.py::test_fp8_greedy_output_identical_on_device_host_and_disk",
    "test_table_store.py::test_row_files_served_without_the_checkpoint_tables",
    "test_table_store.py::test_row_cache_peak_rss_is_its_configured_size",
    "test_matformer.py::test_slices_are_standalone_models_counted_by_the_accounting",
    "test_memory_variants.py::test_ultramem_delta_gradient_is_the_value_table_gradient",
    "test_table_store.py::test_split_decode_step_equals_the_unsplit_step",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        node = item.nodeid.split("/")[-1]  # "test_x.py::test_y[param]"
        if node.split("::")[0] in SLOW_MODULES or node.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory) -> str:
    """A small text corpus, once per module, written by the module's own `_write_corpus` (the
    training tests' random words, the experiment tests' phrases)."""
    path = str(tmp_path_factory.mktemp("corpus") / "corpus.txt")
    request.module._write_corpus(path)
    return path
