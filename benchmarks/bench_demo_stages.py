"""Benchmark 6: the demo's training stages on 2 data-parallel CPU processes vs 1.

Runs the demo's data, model and training stages (`demo.run.run_training_stages`: the demo's
own stage functions, batch sizes and settings) with each training stage limited to a fixed
number of optimiser steps instead of its wall-clock share, on 1 process and on 2 (gloo, 1
thread each), interleaved (1, 2, 1, 2, ...), each in a fresh process. Each run's summary.json
gives the optimiser steps per second of every training stage (VLM pretraining, SAE
pretraining, supervised warm-up, GRPO; setup excluded) and each process's peak resident
memory. Both settings use the same global batch (each of the 2 ranks computes half of it), so
steps per second compare like with like: the target is >= 1.7x for the stages the budget
scales with.

Before any timing counts, the runs must agree: every stage took its steps, and on 2
processes the replicas were bit-identical after GRPO. The load average before each run is
printed: other work on the machine slows the 2-process runs (which need both cores) more
than the 1-process ones.

    python benchmarks/bench_demo_stages.py [--repeats 2 --vlm-steps 60 --sft-steps 30
                                            --grpo-steps 8 --num-train 2000]
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


def add_stage_arguments(
    parser: argparse.ArgumentParser, *, vlm_steps: int, sft_steps: int, grpo_steps: int
) -> None:
    """The options of a fixed-steps run of the demo's stages (benchmarks 6 and 8)."""
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting")
    parser.add_argument("--vlm-steps", type=int, default=vlm_steps)
    parser.add_argument("--sft-steps", type=int, default=sft_steps)
    parser.add_argument("--grpo-steps", type=int, default=grpo_steps)
    parser.add_argument("--num-train", type=int, default=2000, help="training examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="only cpu (the demo runs on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="ignored: 1 per process")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_stage_arguments(parser, vlm_steps=60, sft_steps=30, grpo_steps=8)
    parser.add_argument("--worker", nargs=2, metavar=("PROCESSES", "OUT"), help=argparse.SUPPRESS)
    # worker only: import the package from this checkout (benchmark 8 times another commit)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def steps_of(args: argparse.Namespace) -> dict[str, int]:
    return {
        "vlm_pretraining": args.vlm_steps,
        "supervised_warmup": args.sft_steps,
        "grpo": args.grpo_steps,
    }


def import_package_from(root: str | Path):
    """Import `modeling_segcompass` from the checkout at `root` (before any other copy)."""
    root = Path(root).resolve()
    sys.path.insert(0, str(root))
    import modeling_segcompass

    imported = Path(modeling_segcompass.__file__).resolve()
    if root not in imported.parents:
        sys.exit(f"--root {root}: modeling_segcompass was imported from {imported}")
    return modeling_segcompass


def worker(args: argparse.Namespace) -> None:
    """One run (in the fresh process the benchmark starts): the stages, summary.json in OUT."""
    if args.root:
        import_package_from(args.root)
    from modeling_segcompass.demo.run import run_training_stages

    processes, out = int(args.worker[0]), Path(args.worker[1])
    run_training_stages(
        out, processes=processes, fixed_steps=steps_of(args), num_train=args.num_train,
        seed=args.seed,
    )  # fmt: skip


def run_once(args: argparse.Namespace, processes: int, out: Path, root: Path | None = None) -> dict:
    """One run in a fresh interpreter; its summary.json plus the load before it.

    `root`: the checkout the run imports the package from (default: this one)."""
    load = os.getloadavg()[0]
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", str(processes), str(out),
        "--vlm-steps", str(args.vlm_steps), "--sft-steps", str(args.sft_steps),
        "--grpo-steps", str(args.grpo_steps), "--num-train", str(args.num_train),
        "--seed", str(args.seed),
    ]  # fmt: skip
    if root is not None:
        command += ["--root", str(root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cwd = ROOT if root is None else root
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"the stages on {processes} process(es) in {cwd} failed:\n{result.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["load_before"] = load
    return summary


def check_agreement(summary: dict, processes: int, steps: dict[str, int]) -> None:
    """Every stage took its steps, and the replicas stayed identical."""
    problems = []
    if summary["processes"] != processes:
        problems.append(f"ran on {summary['processes']} processes, not {processes}")
    taken = {
        "vlm_pretraining": summary["vlm_pretraining"].get("steps"),
        "supervised_warmup": summary["sft_steps"],
        "grpo": summary["grpo_steps"],
    }
    if taken != steps:
        problems.append(f"steps taken {taken}, asked {steps}")
    if processes > 1 and summary["replicas_identical"] is not True:
        problems.append("the ranks' parameters differ after GRPO")
    if problems:
        sys.exit(f"AGREEMENT FAILED ({processes} processes): " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.device != "cpu":
        sys.exit("bench_demo_stages: the demo's data parallelism is on CPU processes (gloo).")
    import torch

    from benchmarks.harness import machine_summary
    from modeling_segcompass.training.allocator import keep_freed_memory

    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        for repeat in range(args.repeats):
            for processes in (1, 2):  # interleaved: the machine's load hits both alike
                out = Path(tmp, f"p{processes}-r{repeat}")
                summary = run_once(args, processes, out)
                check_agreement(summary, processes, steps_of(args))
                runs[processes].append(summary)
                rates = ", ".join(f"{s} {summary['steps_per_s'][s]:.2f}" for s in STAGES)
                print(
                    f"run {repeat + 1}, {processes} process(es), load before "
                    f"{summary['load_before']:.2f}: steps/s {rates}; peak MiB "
                    f"{summary['peak_memory_mb']}; wall {summary['wall_time_s']:.0f} s",
                    flush=True,
                )
    print("agreement: every run took every stage's steps; 2-process replicas identical")
    torch.set_num_threads(1)  # what each run's processes use
    keep_freed_memory()  # as each run's processes do (demo.run._run_rank)
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
