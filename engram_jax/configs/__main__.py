"""`python -m engram_jax.configs`: the shipped configs with their parameter counts.

Counts come from `engram_jax.accounting` (shapes only, nothing is allocated); pass them as
`--config=<name>` to `engram_jax.train`, `engram_jax.accounting` or `engram_jax.generate`.
"""

from __future__ import annotations

import ast
import re
import sys

from engram_jax.accounting import account
from engram_jax.config import load_config_file, validate
from engram_jax.configs import config_names, config_path


def _summary(name: str) -> str:
    """First sentence of the config file's docstring."""
    source = config_path(name).read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source)) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    first = re.sub(r" \([^()]*§[^()]*\)", "", first)  # drop section references
    return first.split(": ")[0] if len(first) > 70 else first


def _millions(n: int) -> str:
    if n == 0:
        return "-"
    return f"{n / 1e6:,.2f}M" if n < 1e9 else f"{n / 1e9:,.2f}B"


def table() -> str:
    """The listing: name, total, activated and Engram-table parameters, description."""
    header = f"{'name':<18}{'total':>10}{'activated':>11}{'tables':>10}  description"
    lines = [header, "-" * len(header)]
    for name in config_names():
        config = validate(load_config_file(config_path(name)))
        acc = account(config.model, config.train.seq_len)
        lines.append(
            f"{name:<18}{_millions(acc.total_params):>10}{_millions(acc.activated_params):>11}"
            f"{_millions(acc.engram_table_params):>10}  {_summary(name)}"
        )
    lines.append("")
    lines.append(
        "Use as --config=<name>, e.g. python -m engram_jax.train --config=tiny --workdir=DIR"
    )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1:
        sys.exit(f"usage: python -m engram_jax.configs (no arguments); got {sys.argv[1:]}")
    print(table())


if __name__ == "__main__":
    from engram_jax import cli

    cli.call(main)
