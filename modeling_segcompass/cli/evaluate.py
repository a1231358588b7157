"""The ``eval`` command: metrics per family on ``--data``, printed as a table and written as
JSON with the per-sample IoUs (`evaluation.rows.evaluate_rows`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..evaluation.rows import evaluate_rows
from .common import CLIError, require_positive, seed_everything, write_json
from .data import need_responses, parse_data_spec, read_rows
from .model_folder import load_model


def cmd_eval(args: argparse.Namespace) -> int:
    """`segcompass eval`: metrics per family, printed as a table and written as JSON."""
    output = Path(args.output)
    if output.is_dir():
        raise CLIError(f"--output {str(output)!r} is a folder; give a file name such as eval.json.")
    require_positive(args, "batch_size", "max_new_tokens")
    spec = parse_data_spec(args.data)
    seed_everything(args.seed)
    loaded = load_model(args.model, device=args.device)
    rows = read_rows(args, spec, num_slots=loaded.model.config.num_slots, default_count=64)
    if not rows:
        raise CLIError(f"--data {args.data!r} holds no example to evaluate.")
    if args.teacher_forced:
        need_responses(rows, spec, "--teacher-forced")
    start = time.time()
    run = evaluate_rows(
        loaded.model,
        loaded.processor,
        rows,
        teacher_forced=args.teacher_forced,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        empty_iou=float(args.empty_iou),
        confidence_threshold=args.confidence_threshold,
        mask_threshold=args.mask_threshold,
        progress=not args.no_progress,
    )
    table = run.metrics.to_table()
    report = {
        **run.metrics.to_dict(),
        "table": table,
        "model": str(loaded.folder),
        "data": args.data,
        "mode": "teacher_forced" if args.teacher_forced else "end_to_end",
        "num_samples": len(rows),
        "seconds": round(time.time() - start, 2),
        "samples": run.samples,
    }
    write_json(output, report)
    mode = "teacher-forced (gold reasoning)" if args.teacher_forced else "end to end"
    print(f"{len(rows)} examples of {args.data}, {mode}, metrics in percent:\n")
    print(table)
    print(f"\nwritten to {output}")
    return 0


__all__ = ["cmd_eval"]
