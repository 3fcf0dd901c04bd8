"""Hash table sizes of the N-gram hasher: distinct primes searched upward from each order's base
(docs/design.md §1.3 step 2). Pure Python; `engram_jax.hashing` re-exports `table_primes`, and
the model and the accounting use it to know table shapes from the config alone.
"""

from __future__ import annotations

from collections.abc import Sequence

# First 12 primes: deterministic Miller-Rabin with these bases is exact below 3.3e24 > 2^63.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
_MAX_PRIME = 2**31  # every hash must fit int32 output


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (first 12 prime bases), exact for n < 2^64; Python ints."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def table_primes(
    vocab_bases: Sequence[int],
    heads_per_ngram: int,
    layer_ids: Sequence[int],
) -> dict[int, list[int]]:
    """Per-layer hash table sizes (primes), order-major, exactly as docs/design.md §1.3 step 2.

    One base per order 2..N. Primes are searched upward from each order's base and never reused
    across layers, orders or heads. They do not depend on the vocabulary, so a model's table
    shapes follow from its config alone.

    Raises:
      ValueError: a prime would reach 2^31 (hash ids are int32).
    """
    seen: set[int] = set()
    primes_by_layer: dict[int, list[int]] = {}
    for layer in layer_ids:
        primes = []
        for base in vocab_bases:
            candidate = base - 1
            for _ in range(heads_per_ngram):
                candidate += 1
                while candidate < _MAX_PRIME and (candidate in seen or not _is_prime(candidate)):
                    candidate += 1
                if candidate >= _MAX_PRIME:
                    raise ValueError(
                        f"NgramHasher: vocab_bases={list(vocab_bases)} with "
                        f"heads_per_ngram={heads_per_ngram} and {len(layer_ids)} layers "
                        "needs primes >= 2^31; expected all hash table sizes < 2^31 "
                        "(int32 ids)"
                    )
                seen.add(candidate)
                primes.append(candidate)
        primes_by_layer[layer] = primes
    return primes_by_layer
