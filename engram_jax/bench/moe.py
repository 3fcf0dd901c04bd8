"""MoE dispatch benchmark: forward+backward tokens/s of the dispatches, side by side.

python -m engram_jax.bench.moe                     # D=256, E=16, K=4, F=512, 4 x 1024 tokens
python -m engram_jax.bench.moe --dtype=bfloat16 --experts=64 --top_k=6

Each variant times `jit(value_and_grad(sum(MoE(x)**2)))` over params and input. After one warm-up
call each, the variants are timed in turn, round after round, and the median per variant is
reported (so a change of machine load during the run hits every variant alike), with its ratio
to "capacity" at the given capacity factor (the default before "dropless"). A dense all-experts
computation is the correctness reference: every dropless variant must match it; it is timed too,
only to show what "no dense compute" saves.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import moe
from engram_jax.bench._timing import interleaved_samples, machine_description, print_table


def _dense_routed(x_XD, experts_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Every expert on every token, weighted by a dense [X, E] gate matrix (reference only)."""
    e = w_gate_EDF.shape[0]
    gates_XE = jnp.sum(jax.nn.one_hot(experts_XK, e) * gates_XK[..., None], axis=1)  # [X, K, E]
    h_XEF = jax.nn.silu(jnp.einsum("xd,edf->xef", x_XD, w_gate_EDF)) * jnp.einsum(
        "xd,edf->xef", x_XD, w_up_EDF
    )
    y_XED = jnp.einsum("xef,efd->xed", h_XEF, w_down_EFD)
    return jnp.einsum("xe,xed->xd", gates_XE, y_XED.astype(jnp.float32)).astype(x_XD.dtype)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--d", type=int, default=256, help="model width D")
    parser.add_argument("--experts", type=int, default=16, help="routed experts E")
    parser.add_argument("--top_k", type=int, default=4, help="experts per token K")
    parser.add_argument("--ffn", type=int, default=512, help="expert width F")
    parser.add_argument("--shared", type=int, default=1, help="shared experts")
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--block_size", type=int, default=moe.DEFAULT_BLOCK_SIZE)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument(
        "--skip_ragged", action="store_true", help="leave out ragged (slow on CPU: ~30x)"
    )
    return parser.parse_args()


def _names(args: argparse.Namespace) -> dict[str, str]:
    """The variants' printed names by role."""
    e, k = args.experts, args.top_k
    return {
        "dropless": f"dropless, block {args.block_size} (default)",
        "capacity": f"capacity cf={args.capacity_factor:g} (old default)",
        "never_drops": f"capacity cf=E/K={e / k:g} (never drops)",
        "ragged": "ragged (lax.ragged_dot)",
    }


def _routed_outputs(args, params, bias_vars, x_BTD) -> tuple[dict[str, tuple], jax.Array]:
    """Routed outputs (and dropped slots) of each dispatch function, and the dense all-experts
    reference they are compared with."""
    b, t, d = x_BTD.shape
    names = _names(args)
    x_XD = x_BTD.reshape(b * t, d).astype(args.dtype)
    logits_XE = x_BTD.reshape(b * t, d) @ params["router_kernel"]
    _, gates_XK, experts_XK = moe.route(logits_XE, bias_vars["bias"], args.top_k)
    w = [params[n].astype(args.dtype) for n in ("w_gate", "w_up", "w_down")]
    reference_XD = jax.jit(_dense_routed)(x_XD, experts_XK, gates_XK, *w)
    capacity = moe.expert_capacity(b * t, args.top_k, args.experts, args.capacity_factor)
    no_drops = jnp.zeros(())
    routed = {
        names["dropless"]: (
            moe.expert_ffn_dropless(x_XD, experts_XK, gates_XK, *w, args.block_size),
            no_drops,
        ),
        names["capacity"]: moe.expert_ffn_capacity(x_XD, experts_XK, gates_XK, *w, capacity),
        names["never_drops"]: moe.expert_ffn_capacity(x_XD, experts_XK, gates_XK, *w, b * t),
    }
    if not args.skip_ragged:
        routed[names["ragged"]] = (
            moe.expert_ffn_ragged(x_XD, experts_XK, gates_XK, *w),
            no_drops,
        )
    return routed, reference_XD


def _timed_steps(args, base: moe.MoE, bias_vars, shape: tuple[int, int, int]) -> dict:
    """`jit(value_and_grad)` of `sum(y**2)` (plus the balance loss) for every dispatch and for
    the dense all-experts computation."""
    b, t, d = shape
    names = _names(args)
    variants = {
        names["dropless"]: base.clone(dispatch="dropless", block_size=args.block_size),
        names["capacity"]: base.clone(dispatch="capacity", capacity_factor=args.capacity_factor),
        names["never_drops"]: base.clone(
            dispatch="capacity", capacity_factor=args.experts / args.top_k
        ),
    }
    if not args.skip_ragged:
        variants[names["ragged"]] = base.clone(dispatch="ragged")

    def loss(p, x, module):
        y, stats = module.apply({"params": p, "moe_bias": bias_vars}, x)
        return jnp.sum(jnp.square(y.astype(jnp.float32))) + stats["balance_loss"]

    def dense_loss(p, x):
        x_XD = x.reshape(b * t, d).astype(args.dtype)
        _, gates_XK, experts_XK = moe.route(
            x.reshape(b * t, d) @ p["router_kernel"], bias_vars["bias"], args.top_k
        )
        ws = [p[n].astype(args.dtype) for n in ("w_gate", "w_up", "w_down")]
        return jnp.sum(
            jnp.square(_dense_routed(x_XD, experts_XK, gates_XK, *ws).astype(jnp.float32))
        )

    timed = {
        name: jax.jit(jax.value_and_grad(lambda p, x, m=m: loss(p, x, m), argnums=(0, 1)))
        for name, m in variants.items()
    }
    timed["dense all-experts (reference)"] = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1)))
    return timed


def main() -> None:
    args = _parse_args()
    b, t, d, e, k, f = args.batch, args.seq, args.d, args.experts, args.top_k, args.ffn
    x_BTD = jax.random.normal(jax.random.PRNGKey(1), (b, t, d), jnp.float32)
    base = moe.MoE(
        num_experts=e,
        top_k=k,
        expert_hidden_size=f,
        num_shared_experts=args.shared,
        dtype=jnp.dtype(args.dtype),
    )
    variables = nn.meta.unbox(base.init(jax.random.PRNGKey(0), x_BTD))
    params, bias_vars = variables["params"], variables["moe_bias"]

    # Correctness: routed outputs of each dispatch against the dense all-experts reference.
    routed, reference_XD = _routed_outputs(args, params, bias_vars, x_BTD)
    scale = float(jnp.abs(reference_XD.astype(jnp.float32)).max())
    timed = _timed_steps(args, base, bias_vars, (b, t, d))
    for fn in timed.values():
        jax.block_until_ready(fn(params, x_BTD))  # compile and warm up
    samples = interleaved_samples(
        {name: functools.partial(fn, params, x_BTD) for name, fn in timed.items()}, args.repeats
    )

    rows = []
    for name, times in samples.items():
        seconds = statistics.median(times)
        row = {"variant": name, "ms": seconds * 1e3, "tokens/s": b * t / seconds}
        if name in routed:
            y_XD, dropped = routed[name]
            diff = float(jnp.abs(y_XD.astype(jnp.float32) - reference_XD.astype(jnp.float32)).max())
            row["rel. err vs dense"] = diff / scale
            row["dropped slots"] = float(dropped)
        rows.append(row)
    capacity_name = _names(args)["capacity"]
    capacity_tokens = next(r["tokens/s"] for r in rows if r["variant"] == capacity_name)
    for row in rows:
        row["vs capacity"] = row["tokens/s"] / capacity_tokens

    print(machine_description())
    print(
        f"MoE fwd+bwd: B={b} T={t} D={d} E={e} K={k} F={f} shared={args.shared} "
        f"dtype={args.dtype}; capacity C={moe.expert_capacity(b * t, k, e, args.capacity_factor)}"
        f"; dropless block {moe.dropless_block_size(b * t * k, e, args.block_size)}; "
        f"{args.repeats} rounds"
    )
    columns = ["variant", "ms", "tokens/s", "vs capacity", "rel. err vs dense", "dropped slots"]
    print_table(rows, columns)


if __name__ == "__main__":
    from engram_jax import cli

    cli.call(main)
