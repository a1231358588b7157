"""The ``demo`` command: the embedded default end to end (`demo.run_demo`), what `make demo`
runs; prints the run's summary."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import CLIError


def parse_config_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}``; a value is read as JSON, else kept as a string."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--config takes KEY=VALUE (e.g. codebook_dim=64); got {pair!r}.")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    return overrides


def cmd_demo(args: argparse.Namespace) -> int:
    """`segcompass demo`: the embedded default end to end (`demo.run_demo`)."""
    from ..demo import run as demo_run

    if args.minutes <= 0:
        raise CLIError(f"--minutes must be > 0, got {args.minutes}.")
    summary = demo_run.run_demo(
        args.output_dir,
        minutes=args.minutes,
        seed=args.seed,
        quick=args.quick,
        threads=args.threads,
        cot_style=args.cot_style,
        config_overrides=parse_config_overrides(getattr(args, "config", []) or []),
        processes=getattr(args, "processes", None),
    )
    text = summary.to_text() if hasattr(summary, "to_text") else json.dumps(summary.to_dict())
    print(text)
    return 0


__all__ = ["cmd_demo", "parse_config_overrides"]
