"""Host-side N-gram hashing throughput: NgramHasher vs a straightforward numpy transcription of the
demo.

python -m engram_jax.bench.hashing [--batch 16 --seq-len 4096 --vocab 98000 --repeats 15
    --threads 2]

Single-threaded figures are the comparison (all variants run in this process on the same inputs,
interleaved so they share the machine's load): the reference, NgramHasher with its numba kernel and
NgramHasher's pure numpy fallback. The threaded figure splits token blocks over threads (the kernel
releases the GIL). Tokens = batch * seq_len, hashed for all layers. Ratios are given from the median
and from the minimum of the repeats.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(
        _var, "1"
    )  # neither side uses BLAS; keep stray pools from competing for cores

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from engram_jax import hashing  # noqa: E402
from engram_jax.bench._timing import interleaved_samples, machine_description  # noqa: E402
from engram_jax.hashing import NgramHasher  # noqa: E402


def _reference_hash(hasher: NgramHasher, ids_BT: np.ndarray, layer_id: int) -> np.ndarray:
    """Straightforward transcription of the demo's hash (§1.3); mixes recomputed per head."""
    n = hasher.max_ngram
    t = ids_BT.shape[1]
    x = ids_BT.astype(np.int64)
    shifts = [x] + [
        np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=hasher.pad_id)[:, :t]
        for k in range(1, n)
    ]
    m = hasher.multipliers(layer_id)
    primes = hasher.head_vocab_sizes(layer_id)
    hashes = []
    for order in range(2, n + 1):
        for j in range(hasher.heads_per_ngram):
            mix = shifts[0] * m[0]
            for k in range(1, order):
                mix = np.bitwise_xor(mix, shifts[k] * m[k])
            hashes.append(mix % primes[(order - 2) * hasher.heads_per_ngram + j])
    return np.stack(hashes, axis=2)  # [B, T, H] int64, like the demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="rows B")
    parser.add_argument("--seq-len", type=int, default=4096, help="positions T")
    parser.add_argument("--vocab", type=int, default=98000, help="compressed vocabulary V'")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions (median, min)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the threaded figure")
    args = parser.parse_args(argv)

    hasher = NgramHasher(
        vocab_bases=[646400, 646400],
        max_ngram=3,
        heads_per_ngram=8,
        layer_ids=[1, 15],
        token_vocab_size=args.vocab,
        pad_id=2,
        seed=0,
    )
    rng = np.random.default_rng(0)
    ids_BT = rng.integers(0, args.vocab, size=(args.batch, args.seq_len), dtype=np.int64)
    tokens = args.batch * args.seq_len

    def numpy_fallback() -> dict[int, np.ndarray]:
        hashing._USE_NUMBA = False
        try:
            return hasher.hash_all(ids_BT)
        finally:
            hashing._USE_NUMBA = True

    start = time.perf_counter()
    fast = hasher.hash_all(ids_BT)  # first call: numba compile, or load from its on-disk cache
    first_call = time.perf_counter() - start
    numba_used = hashing._compiled_kernel() is not None
    reference = {layer: _reference_hash(hasher, ids_BT, layer) for layer in hasher.layer_ids}
    threaded = hasher.hash_all(ids_BT, num_threads=args.threads)
    fallback = numpy_fallback()
    identical = all(
        np.array_equal(reference[layer], fast[layer])
        and np.array_equal(fast[layer], threaded[layer])
        and np.array_equal(fast[layer], fallback[layer])
        for layer in hasher.layer_ids
    )
    print(machine_description())
    print(
        f"B={args.batch} T={args.seq_len} V'={args.vocab} bases=[646400, 646400] N=3 K=8 "
        f"layers={list(hasher.layer_ids)}; tokens/s count B*T hashed for all layers"
    )
    print(f"load average (1, 5, 15 min): {os.getloadavg()}")
    print(f"numba kernel: {numba_used}; first call (compile or cache load): {first_call:.2f} s")
    print(f"outputs identical: {identical}")
    if not identical:
        raise SystemExit("outputs differ from the reference transcription")

    # Interleaved repeats: the variants share whatever load the machine has at each moment.
    runs = {
        "reference": lambda: [_reference_hash(hasher, ids_BT, layer) for layer in hasher.layer_ids],
        "NgramHasher": lambda: hasher.hash_all(ids_BT),
        "numpy fallback": numpy_fallback,
        f"NgramHasher {args.threads} threads": lambda: hasher.hash_all(
            ids_BT, num_threads=args.threads
        ),
    }
    samples = interleaved_samples(runs, args.repeats)
    med_ref, min_ref = statistics.median(samples["reference"]), min(samples["reference"])
    print("| variant | tokens/s (median) | ms (median) | ms (min) | x ref (median) | x ref (min) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, times in samples.items():
        med, low = statistics.median(times), min(times)
        print(
            f"| {name} | {tokens / med:,.0f} | {med * 1e3:.2f} | {low * 1e3:.2f} | "
            f"{med_ref / med:.2f}x | {min_ref / low:.2f}x |"
        )
    print(f"load average after (1, 5, 15 min): {os.getloadavg()}")


if __name__ == "__main__":
    from engram_jax import cli

    cli.call(main)
