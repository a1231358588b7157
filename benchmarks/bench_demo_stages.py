"""Benchmark 6: the demo's training stages on 2 data-parallel CPU processes vs 1.

Runs the embedded default (`segcompass demo`, a reduced wall budget) with ``--processes 1``
and ``--processes 2``, interleaved (1, 2, 1, 2, ...), each in a fresh process, and reads
each run's summary.json: optimiser steps per second of every training stage (VLM pretraining,
SAE pretraining, supervised warm-up, GRPO) and each process's peak resident memory. Both
settings use the same global batch (each of the 2 ranks computes half of it), so steps per
second compare like with like: the target is >= 1.7x for the stages the budget scales with.

Before any timing counts, the runs must agree: every stage ran, the exported model reloaded
in a fresh process, and on 2 processes the replicas were bit-identical after GRPO. The load
average before each run is printed: other work on the machine slows the 2-process runs (which
need both cores) more than the 1-process ones.

    python benchmarks/bench_demo_stages.py [--minutes 3 --repeats 2 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

STAGES = ("vlm_pretraining", "sae_pretraining", "supervised_warmup", "grpo")
TARGET = 1.7


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="wall budget of each run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="only cpu (the demo runs on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="ignored: 1 per process")
    return parser.parse_args(argv)


def run_once(processes: int, minutes: float, seed: int, out: Path) -> dict:
    """One demo run in a fresh interpreter; its summary.json plus the load before it."""
    load = os.getloadavg()[0]
    command = [
        sys.executable, "-m", "modeling_segcompass.cli", "demo", "--output-dir", str(out),
        "--minutes", str(minutes), "--seed", str(seed), "--processes", str(processes),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"demo on {processes} process(es) failed:\n{result.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["load_before"] = load
    return summary


def check_agreement(summary: dict, processes: int) -> None:
    """Every stage ran, the export reloaded, and the replicas stayed identical."""
    problems = []
    if summary["processes"] != processes:
        problems.append(f"ran on {summary['processes']} processes, not {processes}")
    missing = [s for s in STAGES if summary["steps_per_s"].get(s, 0) <= 0]
    if missing:
        problems.append(f"stages without steps: {missing}")
    if not summary["reload_check"].get("ok"):
        problems.append("the exported model did not reload")
    if processes > 1 and summary["replicas_identical"] is not True:
        problems.append("the ranks' parameters differ after GRPO")
    if problems:
        sys.exit(f"AGREEMENT FAILED ({processes} processes): " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device != "cpu":
        sys.exit("bench_demo_stages: the demo's data parallelism is on CPU processes (gloo).")
    import torch

    from benchmarks.harness import machine_summary

    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        for repeat in range(args.repeats):
            for processes in (1, 2):  # interleaved: the machine's load hits both alike
                out = Path(tmp, f"p{processes}-r{repeat}")
                summary = run_once(processes, args.minutes, args.seed, out)
                check_agreement(summary, processes)
                runs[processes].append(summary)
                rates = ", ".join(f"{s} {summary['steps_per_s'][s]:.2f}" for s in STAGES)
                print(
                    f"run {repeat + 1}, {processes} process(es), load before "
                    f"{summary['load_before']:.2f}: steps/s {rates}; peak MiB "
                    f"{summary['peak_memory_mb']}; wall {summary['wall_time_s']:.0f} s",
                    flush=True,
                )
    print("agreement: every run trained every stage and reloaded; 2-process replicas identical")
    print(machine_summary(torch.device("cpu")))
    results = []
    for stage in STAGES:
        one = statistics.median(r["steps_per_s"][stage] for r in runs[1])
        two = statistics.median(r["steps_per_s"][stage] for r in runs[2])
        ratio = two / one
        goal = "" if stage == "sae_pretraining" else f" (target >= {TARGET}x: "
        if goal:
            goal += ("met" if ratio >= TARGET else "NOT met") + ")"
        else:
            goal = " (every rank trains the same SAE for ~6 s: not split, no target)"
        results.append(
            f"RESULT demo {stage}: {two:.3f} vs {one:.3f} steps/s on 2 vs 1 processes, "
            f"{ratio:.2f}x{goal}"
        )
    peak_one = statistics.median(max(r["peak_memory_mb"].values()) for r in runs[1])
    peak_two = statistics.median(sum(r["peak_memory_mb"].values()) for r in runs[2])
    loads = [r["load_before"] for setting in runs.values() for r in setting]
    results.append(
        f"RESULT demo peak memory: {peak_two:.0f} MiB over 2 processes (sum) vs {peak_one:.0f} "
        f"MiB on 1; load average before the runs {min(loads):.2f}-{max(loads):.2f}"
    )
    for line in results:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
