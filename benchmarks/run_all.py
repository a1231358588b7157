"""Run every benchmark, each in a fresh Python process, and print all RESULT lines at the end.

    python benchmarks/run_all.py [--device cpu|cuda] [--threads N] [--only forward_backward ...]

A fresh process per benchmark keeps one benchmark's allocations and thread pools from
colouring the next one. A benchmark whose agreement check fails exits non-zero; this script
then exits non-zero too (a missed performance target does not fail the run: it is reported).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (script, description); in the order of docs/performance.md
BENCHMARKS = {
    "forward_backward": (
        "bench_forward_backward.py",
        "1. segmentation fwd+bwd, one vs two VLM passes",
    ),
    "concept_path": ("bench_concept_path.py", "2. concept path at paper dims, sparse vs dense"),
    "mask_decoding": ("bench_mask_decoding.py", "3. mask decoding, batched vs per-image loop"),
    "grpo_step": ("bench_grpo_step.py", "4. GRPO step with vs without the mask loss"),
    "inference": ("bench_inference.py", "5. inference latency and throughput, tiny default"),
    "demo_stages": ("bench_demo_stages.py", "6. demo training stages, 2 processes vs 1"),
    "training_step": (
        "bench_training_step.py",
        "7. training step of the tiny default, optimised vs straightforward (1 thread)",
    ),
    "demo_speedup": (
        "bench_demo_speedup.py",
        "8. demo training stages on 1 process, this checkout vs an earlier commit",
    ),
}

#: benchmarks of CPU processes only (skipped, with a line saying so, on other devices)
CPU_ONLY = {"demo_stages", "demo_speedup"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or list(BENCHMARKS)
    common = ["--device", args.device]
    if args.threads is not None:
        common += ["--threads", str(args.threads)]
    summary: list[str] = []
    failed: list[str] = []
    for name in names:
        script, description = BENCHMARKS[name]
        path = HERE / script
        print(f"\n######## {description} ({script})", flush=True)
        if (
            name == "grpo_step"
            and not (ROOT / "modeling_segcompass" / "training" / "grpo_trainer.py").exists()
        ):
            line = f"SKIPPED {description}: modeling_segcompass/training/grpo_trainer.py does not exist yet"
            print(line)
            summary.append(line)
            continue
        if name in CPU_ONLY and args.device != "cpu":
            line = f"SKIPPED {description}: it measures CPU processes (run it with --device cpu)"
            print(line)
            summary.append(line)
            continue
        if not path.exists():
            line = f"SKIPPED {description}: {script} is not written yet (see docs/performance.md)"
            print(line)
            summary.append(line)
            continue
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(path), *common],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("USDT:"):  # the CPU profiler's start/stop chatter
                continue
            print(line, end="", flush=True)
            if line.startswith(("RESULT", "machine:")) and not (
                line.startswith("machine:") and summary and summary[0].startswith("machine:")
            ):
                summary.append(line.rstrip())
        code = proc.wait()
        elapsed = time.perf_counter() - start
        print(f"({script} took {elapsed:.0f} s, exit code {code})")
        if code != 0:
            failed.append(name)
            summary.append(f"FAILED {description}: exit code {code}")
    print("\n######## summary")
    for line in summary:
        print(line)
    if failed:
        print(f"benchmarks that failed: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
