"""What the demo measured (`DemoSummary`) and its two files in the output folder: summary.json
(every figure) and summary.md (the Markdown `segcompass demo` prints)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DemoSummary:
    """What the demo measured. Scores are fractions in [0, 1]."""

    output_dir: str
    wall_time_s: float
    stage_times_s: dict[str, float] = field(default_factory=dict)
    num_train: int = 0
    num_held_out: int = 0
    vlm_pretraining: dict[str, float] = field(default_factory=dict)
    image_dependence: dict[str, float] = field(default_factory=dict)
    sae: dict[str, float] = field(default_factory=dict)
    sft_steps: int = 0
    grpo_steps: int = 0
    oracle_cot_warmup: dict[str, Any] = field(default_factory=dict)
    oracle_cot: dict[str, Any] = field(default_factory=dict)
    end_to_end_warmup: dict[str, Any] = field(default_factory=dict)
    end_to_end: dict[str, Any] = field(default_factory=dict)
    answer_phrase_accuracy: float | None = None
    reload_check: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    #: data-parallel processes of the training stages (1: one process, no torch.distributed)
    processes: int = 1
    #: optimiser steps per second of each training stage (SAE: its training steps)
    steps_per_s: dict[str, float] = field(default_factory=dict)
    #: peak resident memory of each process in MiB
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    #: whether every rank held the same parameters after GRPO (True on one process)
    replicas_identical: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        """The summary as Markdown: what `segcompass demo` prints and writes to summary.md."""

        def table(name: str, result: dict[str, Any]) -> str:
            return f"### {name}\n\n{result.get('table', '(not run)')}\n"

        steps = (
            f"VLM pretraining {self.vlm_pretraining.get('steps', 0)}, "
            f"supervised warm-up {self.sft_steps}, GRPO {self.grpo_steps}"
        )
        lines = [
            "# SegCompass demo summary",
            "",
            f"- wall time: {self.wall_time_s / 60:.1f} min ({self.wall_time_s:.0f} s)",
            f"- output folder: {self.output_dir}",
            "- stage times (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in self.stage_times_s.items()),
            f"- steps per stage: {steps}",
            "- steps per second: "
            + (", ".join(f"{k} {v:.2f}" for k, v in self.steps_per_s.items()) or "(not run)"),
            f"- processes: {self.processes} (data-parallel training, gloo, 1 thread each)"
            + ("" if self.processes == 1 else f"; replicas identical: {self.replicas_identical}"),
            "- peak memory (MiB): "
            + (", ".join(f"{k} {v:.0f}" for k, v in self.peak_memory_mb.items()) or "-"),
            f"- data: train {self.num_train} / held-out {self.num_held_out} examples",
            f"- config overrides: {self.config_overrides or 'none (the tiny default)'}",
            f"- {_dependence_line(self.image_dependence)}",
            f"- SAE: {self.sae}",
            "",
            "## Held-out evaluation",
            "",
            table(
                "oracle-CoT after warm-up (gold reasoning teacher-forced)", self.oracle_cot_warmup
            ),
            table("oracle-CoT after GRPO", self.oracle_cot),
            table("end-to-end after warm-up (model's own reasoning)", self.end_to_end_warmup),
            table("end-to-end after GRPO (the headline)", self.end_to_end),
            f"answer phrase correct (end-to-end): {self.answer_phrase_accuracy}",
            "",
            "## Reload of the Hub-ready folder in a fresh process (package hidden)",
            "",
            _reload_lines(self.reload_check),
            "",
            "## Training curves (losses and rewards per stage)",
            "",
            "![training curves](training_curves.png)",
        ]
        return "\n".join(lines)


def _reload_lines(result: dict[str, Any]) -> str:
    if not result:
        return "- reload: (not run)"
    if not result.get("ok", False):
        return f"- reload: FAILED\n\n```\n{result.get('error', '')}\n```"
    return "\n".join(
        [
            "- reload: ok",
            f"- loaded class: {result.get('class_module')}",
            f"- instruction: {result.get('instruction')!r}",
            f"- reasoning: {result.get('text')!r}",
            f"- masks: {result.get('num_masks')}, reason: {result.get('reason')}, "
            f"IoU with the gold mask: {result.get('iou')}",
        ]
    )


def _dependence_line(result: dict[str, float]) -> str:
    if not result:
        return "image dependence: (not measured)"
    return (
        "image dependence (held-out LM loss of the gold reasoning, right image vs another "
        f"image): {result['loss_right_image']:.3f} vs {result['loss_other_image']:.3f}"
    )


def write_summary(summary: DemoSummary, out: Path) -> None:
    """summary.json (every figure) and summary.md (what the CLI prints) in the output folder."""
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1, default=str))
    (out / "summary.md").write_text(summary.to_text() + "\n", encoding="utf-8")


__all__ = ["DemoSummary", "write_summary"]
