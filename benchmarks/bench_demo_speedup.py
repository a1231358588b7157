"""Benchmark 8: the demo's training stages on 1 process, this checkout vs an earlier commit.

Benchmark 7 times one step against straightforward forms swapped in by hand; this one times
what a user's `make demo` runs, end to end per optimiser step (data loading and collation,
the Trainer's own work, sampling and reward scoring in GRPO, the step, the optimiser), on
the code of another commit. The earlier commit is checked out into a temporary git worktree;
both trees run `demo.run.run_training_stages` (the demo's own stages, batch sizes and
settings, each stage limited to a fixed number of optimiser steps) in fresh processes, 1
process with 1 thread each, interleaved (REF, this, REF, this, ...). Reported per stage:
optimiser steps per second of each tree (median over the runs) and this tree / REF.

Agreement before any figure counts: every run took every stage's steps, and each run
imported the package from its own tree.

    python benchmarks/bench_demo_speedup.py [--against 360730c --repeats 2 --sft-steps 60
                                             --grpo-steps 8 --vlm-steps 40]

The default REF, 360730c, is the first commit whose demo can run its stages for fixed step
counts (`run_training_stages`): the training step as it was before the allocator, the
channels-first mask decoder, one image encoding per distinct image, the codebook's slot-row
last layer and GRPO rows with array masks.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_demo_stages  # noqa: E402

DEFAULT_REF = "360730c"
STAGES = ("vlm_pretraining", "supervised_warmup", "grpo")
TARGET = 1.5  # issue: the default's training steps per second at 1 process
TARGET_STAGES = ("supervised_warmup", "grpo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", default=DEFAULT_REF, help="git ref of the earlier code")
    bench_demo_stages.add_stage_arguments(parser, vlm_steps=40, sft_steps=60, grpo_steps=8)
    return parser.parse_args(argv)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def add_worktree(ref: str, where: Path) -> None:
    """Check `ref` out into `where` (a detached worktree), or exit naming the problem."""
    if _git("rev-parse", "--git-dir").returncode != 0:
        sys.exit("bench_demo_speedup: needs a git checkout of the repository (it checks out REF).")
    if _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode != 0:
        sys.exit(
            f"bench_demo_speedup: git knows no commit {ref!r} here (a shallow clone?); fetch the "
            "history (git fetch --unshallow) or pass --against REF."
        )
    added = _git("worktree", "add", "--detach", str(where), ref)
    if added.returncode != 0:
        sys.exit(f"bench_demo_speedup: git worktree add failed:\n{added.stderr}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device != "cpu":
        sys.exit("bench_demo_speedup: the demo's stages run on CPU processes.")
    import torch

    from benchmarks.harness import machine_summary
    from modeling_segcompass.training.allocator import keep_freed_memory

    runs: dict[str, list[dict]] = {"ref": [], "this": []}
    label = {"ref": f"ref {args.against}", "this": "this checkout (HEAD and uncommitted changes)"}
    with tempfile.TemporaryDirectory(prefix="bench-speedup-") as tmp:
        ref_tree = Path(tmp, "ref")
        add_worktree(args.against, ref_tree)
        try:
            for repeat in range(args.repeats):
                for name, tree in (("ref", ref_tree), ("this", ROOT)):
                    out = Path(tmp, f"{name}-{repeat}")
                    summary = bench_demo_stages.run_once(args, 1, out, root=tree)
                    bench_demo_stages.check_agreement(summary, 1, bench_demo_stages.steps_of(args))
                    runs[name].append(summary)
                    rates = ", ".join(f"{s} {summary['steps_per_s'][s]:.3f}" for s in STAGES)
                    print(
                        f"run {repeat + 1}, {label[name]}, load before "
                        f"{summary['load_before']:.2f}: steps/s "
                        f"{rates}; wall {summary['wall_time_s']:.0f} s",
                        flush=True,
                    )
        finally:
            _git("worktree", "remove", "--force", str(ref_tree))
    print("agreement: every run took every stage's steps, each from its own tree")
    torch.set_num_threads(1)  # what each run used
    keep_freed_memory()
    print(machine_summary(torch.device("cpu")))
    for stage in STAGES:
        ref = statistics.median(r["steps_per_s"][stage] for r in runs["ref"])
        this = statistics.median(r["steps_per_s"][stage] for r in runs["this"])
        rounds = [
            t["steps_per_s"][stage] / r["steps_per_s"][stage]
            for r, t in zip(runs["ref"], runs["this"], strict=True)
        ]
        goal = ""
        if stage in TARGET_STAGES:
            goal = f" (target >= {TARGET}x: {'met' if this / ref >= TARGET else 'MISSED'})"
        print(
            f"RESULT demo {stage} at 1 process, this tree / {args.against}: {this:.3f} vs "
            f"{ref:.3f} steps/s, {this / ref:.2f}x (per run: "
            f"{', '.join(f'{x:.2f}' for x in rounds)}){goal}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
