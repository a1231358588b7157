"""The ``demo`` command: the embedded default end to end (`demo.run_demo`), what `make demo`
runs; prints the run's summary."""

from __future__ import annotations

import argparse
import json

from .common import CLIError


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
    )
    text = summary.to_text() if hasattr(summary, "to_text") else json.dumps(summary.to_dict())
    print(text)
    return 0


__all__ = ["cmd_demo"]
