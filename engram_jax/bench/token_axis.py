"""A per-token projection's forward and backward with `[B, T, D]` inputs vs one token axis.

python -m engram_jax.bench.token_axis                 # B=16, T=128: tiny's and small_cpu's shapes
python -m engram_jax.bench.token_axis --repeats 20

Each case is `sum(tanh(x W))` differentiated with respect to x and W, once written
`einsum("btd,df->btf")` and once through `layers.token_einsum` (B and T merged into one token
axis by a free reshape). The weight gradient of the first contracts two axes, B and T, which
XLA:CPU lowers with a transposing copy of the `[B, T, F]` cotangent; the second is an ordinary
`[N, D]^T [N, F]` product. Both variants are timed in turn, round after round (median and best),
and checked to give the same gradients.
"""

from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.bench._timing import interleaved_samples, machine_description, print_table
from engram_jax.layers import token_einsum

# (what, D, F): the projections of the shipped CPU configs.
CASES = (
    ("tiny FFN up", 128, 384),
    ("tiny LM head", 128, 4096),
    ("small_cpu FFN up", 256, 768),
    ("small_cpu LM head", 256, 4096),
)


def _loss(project):
    return jax.jit(
        jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(project(x, w))), argnums=(0, 1))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {machine_description()}")
    rows = []
    for what, d, f in CASES:
        keys = jax.random.split(jax.random.PRNGKey(0), 2)
        x = jax.random.normal(keys[0], (args.batch, args.length, d))  # [B, T, D]
        w = jax.random.normal(keys[1], (d, f)) / np.sqrt(d)  # [D, F]
        two_axes = _loss(lambda a, b: jnp.einsum("btd,df->btf", a, b))
        one_axis = _loss(lambda a, b: token_einsum("btd,df->btf", a, b))
        (_, (gx2, gw2)), (_, (gx1, gw1)) = two_axes(x, w), one_axis(x, w)
        same = bool(np.allclose(gw2, gw1, rtol=1e-4, atol=1e-4)) and bool(
            np.allclose(gx2, gx1, rtol=1e-4, atol=1e-4)
        )
        samples = interleaved_samples(
            {"bt": lambda f=two_axes, a=x, b=w: f(a, b), "n": lambda f=one_axis, a=x, b=w: f(a, b)},
            args.repeats,
        )
        med = {k: float(np.median(v)) * 1e3 for k, v in samples.items()}
        best = {k: min(v) * 1e3 for k, v in samples.items()}
        rows.append(
            {
                "projection": f"{what} [{args.batch * args.length}, {d}] x [{d}, {f}]",
                "[B, T, D] ms (median / best)": f"{med['bt']:.2f} / {best['bt']:.2f}",
                "[B*T, D] ms (median / best)": f"{med['n']:.2f} / {best['n']:.2f}",
                "speed-up (median)": f"{med['bt'] / med['n']:.2f}x",
                "same gradients": "yes" if same else "NO",
            }
        )
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
