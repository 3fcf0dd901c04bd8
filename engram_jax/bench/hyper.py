"""Hyper-connection kinds vs the residual (time, memory), Sinkhorn VJP and convergence.

python -m engram_jax.bench.hyper                      # defaults: 8 layers, D=256, 4096 tokens, n=4
python -m engram_jax.bench.hyper --layers 4 --tokens 1024 --repeats 3   # quicker
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from engram_jax import mhc
from engram_jax.bench._timing import machine_description, print_table, time_call


class _Mlp(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x_BTD):
        h_BTF = nn.gelu(nn.Dense(self.hidden, name="up")(x_BTD))
        return nn.Dense(x_BTD.shape[-1], name="down")(h_BTF)


class _Stack(nn.Module):
    """expand -> num_layers x HyperConnection(MLP) -> merge; reads only when `read_only`."""

    kind: str
    n: int
    num_layers: int
    hidden: int
    recompute_grad: bool = True
    read_only: bool = False

    @nn.compact
    def __call__(self, x_BTD):
        x_BTGD = mhc.expand_streams(x_BTD, self.n)
        total = jnp.zeros((), jnp.float32)
        for i in range(self.num_layers):
            hc = mhc.HyperConnection(
                kind=self.kind,
                n_streams=self.n,
                layer_index=i,
                sinkhorn_recompute_grad=self.recompute_grad,
                name=f"hc_{i}",
            )
            if self.read_only:
                # Coefficients + Sinkhorn + read only: the per-layer mixing overhead without F.
                layer_in_BTD, mix = hc.read(x_BTGD)
                total = total + jnp.mean(layer_in_BTD) + jnp.mean(mix.h_res) + jnp.mean(mix.h_post)
            else:
                x_BTGD = hc(x_BTGD, _Mlp(self.hidden, name=f"mlp_{i}"))
        if self.read_only:
            return total
        return mhc.merge_streams(x_BTGD)


def _compile_train_step(model: nn.Module, x_BTD: jax.Array):
    params = meta.unbox(model.init(jax.random.key(0), x_BTD)["params"])

    def loss(p, x):
        out = model.apply({"params": p}, x)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(params, x_BTD).compile()
    return compiled, params


def _static_costs(compiled) -> dict:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "temp_mib": mem.temp_size_in_bytes / 2**20,
        "gflop": float(cost.get("flops", 0.0)) / 1e9,
        "gb_accessed": float(cost.get("bytes accessed", 0.0)) / 1e9,
    }


def _time_interleaved(calls: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median ms per call, timed round-robin so a load change hits every variant alike."""
    for call in calls:
        time_call(call, warmup=2, repeats=1)
    samples = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            samples[i].append(time_call(call, warmup=0, repeats=1))
    return [1e3 * float(np.median(s)) for s in samples]


def _measure_all(rows: list[dict], calls: list[Callable[[], object]], repeats: int) -> None:
    for row, ms in zip(rows, _time_interleaved(calls, repeats), strict=True):
        row["ms"] = ms


def bench_kinds(args) -> None:
    b = 1
    t = args.tokens
    x_BTD = jax.random.normal(jax.random.key(1), (b, t, args.dim), jnp.float32)
    hidden = args.ffn_mult * args.dim
    variants: list[tuple[str, str, int, bool]] = [
        ("residual", "residual", 1, True),
        ("mhc", "mhc", args.streams, True),
        ("mhc (autodiff Sinkhorn)", "mhc", args.streams, False),
        ("hc", "hc", args.streams, True),
        ("mhc_lite", "mhc_lite", args.streams, True),
    ]
    rows, calls = [], []
    for label, kind, n, recompute in variants:
        model = _Stack(kind, n, args.layers, hidden, recompute_grad=recompute)
        compiled, params = _compile_train_step(model, x_BTD)
        rows.append({"variant": label, "n": n, **_static_costs(compiled)})
        calls.append(lambda c=compiled, p=params: c(p, x_BTD))
    _measure_all(rows, calls, args.repeats)
    for row in rows:
        row["time / residual"] = row["ms"] / rows[0]["ms"]
        row["temp / residual"] = row["temp_mib"] / rows[0]["temp_mib"]
    print(f"\n### fwd+bwd of {args.layers} layers (MLP D={args.dim} F={hidden}), {t} tokens\n")
    print_table(
        rows,
        [
            "variant",
            "n",
            "ms",
            "time / residual",
            "temp_mib",
            "temp / residual",
            "gflop",
            "gb_accessed",
        ],
    )

    # Where the mHC time goes: the same stack without F (coefficients, Sinkhorn, read), and the
    # Sinkhorn alone on the same number of [n, n] matrices, all fwd+bwd.
    prof, prof_calls = [], []
    for kind in ("mhc", "hc", "mhc_lite"):
        read_only = _Stack(kind, args.streams, args.layers, hidden, read_only=True)
        compiled, params = _compile_train_step(read_only, x_BTD)
        prof.append({"part": f"{kind}: coefficients + read only", **_static_costs(compiled)})
        prof_calls.append(lambda c=compiled, p=params: c(p, x_BTD))
    logits = jax.random.normal(jax.random.key(2), (args.layers, t, args.streams, args.streams))
    for label, recompute in (("custom VJP", True), ("autodiff", False)):
        sk = (
            jax.jit(
                jax.value_and_grad(
                    lambda z, r=recompute: jnp.mean(mhc.sinkhorn(z, recompute_grad=r) ** 2)
                )
            )
            .lower(logits)
            .compile()
        )
        part = f"sinkhorn alone, {label} ({args.layers} x {t} matrices)"
        prof.append({"part": part, **_static_costs(sk)})
        prof_calls.append(lambda c=sk: c(logits))
    _measure_all(prof, prof_calls, args.repeats)
    full = {r["variant"]: r["ms"] for r in rows}
    for row in prof:
        row["share of mhc step"] = row["ms"] / full["mhc"]
    print(f"\n### Profile: parts of the {args.layers}-layer step, fwd+bwd\n")
    print_table(prof, ["part", "ms", "share of mhc step", "temp_mib", "gflop", "gb_accessed"])


def bench_sinkhorn_vjp(args) -> None:
    rows, calls = [], []
    for count in (args.tokens, 8 * args.tokens):
        logits = jax.random.normal(jax.random.key(3), (count, args.streams, args.streams))
        cot = jax.random.normal(jax.random.key(4), logits.shape)
        for label, recompute in (("custom VJP (recompute)", True), ("autodiff (fori_loop)", False)):

            def loss(z, recompute=recompute, cot=cot):
                return jnp.sum(mhc.sinkhorn(z, recompute_grad=recompute) * cot)

            compiled = jax.jit(jax.value_and_grad(loss)).lower(logits).compile()
            rows.append({"matrices": count, "variant": label, **_static_costs(compiled)})
            calls.append(lambda c=compiled, z=logits: c(z))
        fwd = jax.jit(lambda z: mhc.sinkhorn(z)).lower(logits).compile()
        rows.append({"matrices": count, "variant": "forward only", **_static_costs(fwd)})
        calls.append(lambda c=fwd, z=logits: c(z))
    _measure_all(rows, calls, args.repeats)
    print(f"\n### Sinkhorn value+grad, n={args.streams}, 20 iterations\n")
    print_table(rows, ["matrices", "variant", "ms", "temp_mib", "gflop", "gb_accessed"])


def bench_convergence(args) -> None:
    n = args.streams
    scales = (0.1, 1.0, 10.0, 100.0)
    iters = (5, 10, 20, 50)
    z = jax.random.normal(jax.random.key(5), (1024, n, n))
    fns: dict[int, Callable] = {
        k: jax.jit(lambda x, k=k: mhc.sinkhorn(x, num_iters=k)) for k in iters
    }
    rows = []
    for scale in scales:
        row = {"logit scale": scale}
        for k in iters:
            h = np.asarray(fns[k](scale * z), np.float64)
            row[f"{k} iters"] = f"{np.abs(h.sum(-2) - 1.0).max():.1e}"
        h20 = np.asarray(fns[20](scale * z), np.float64)
        row["row err (20)"] = f"{np.abs(h20.sum(-1) - 1.0).max():.1e}"
        rows.append(row)
    print(
        "\n### Sinkhorn convergence: max |column sum - 1| over 1024 random N(0, scale^2) "
        f"logits, n={n}\n"
    )
    print_table(rows, ["logit scale", *[f"{k} iters" for k in iters], "row err (20)"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="sub-layers in the stack")
    parser.add_argument("--dim", type=int, default=256, help="hidden size D of one stream")
    parser.add_argument("--ffn-mult", type=int, default=4, help="MLP hidden = ffn_mult * D")
    parser.add_argument("--tokens", type=int, default=4096, help="B*T tokens per step")
    parser.add_argument("--streams", type=int, default=4, help="n for hc / mhc / mhc_lite")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument(
        "--only", choices=("kinds", "vjp", "convergence"), default=None, help="run one section"
    )
    args = parser.parse_args(argv)
    print(f"# engram_jax.bench.hyper, {datetime.date.today().isoformat()}")
    print(f"# {machine_description()}")
    print(f"# {vars(args)}")
    if args.only in (None, "convergence"):
        bench_convergence(args)
    if args.only in (None, "vjp"):
        bench_sinkhorn_vjp(args)
    if args.only in (None, "kinds"):
        bench_kinds(args)


if __name__ == "__main__":
    from engram_jax import cli

    cli.call(main)
