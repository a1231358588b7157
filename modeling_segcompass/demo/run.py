"""The embedded default, end to end (what `make demo` runs).

synthetic world -> local tokenizer -> tiny model -> VLM pretraining on image descriptions
-> SAE pretraining -> supervised warm-up
-> GRPO -> evaluation on held-out data (oracle-CoT and end-to-end, per family) ->
interpretability report -> Hub-ready folder -> reload it with `AutoModel(...,
trust_remote_code=True)` and segment a held-out image. Everything lands in one folder.

The wall-clock budget (`minutes`) is split between the stages (fractions of the budget at
which each training stage must end: `STAGE_ENDS`); the learning-rate schedules run on wall
time, so they end when a stage's share does whatever the machine's speed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Fraction of the budget at which each training stage ends. The rest (evaluations, report,
# export and reload) took 35-40 s at 14 minutes on 2 cores (8 %), so the demo ends at about
# 13.5 minutes, inside the 15-minute target.
STAGE_ENDS = {"vlm_pretraining": 0.22, "supervised_warmup": 0.74, "grpo": 0.92}


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
            f"- data: train {self.num_train} / held-out {self.num_held_out} examples",
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


def _answer_phrase(text: str) -> str:
    """The part after 'answer :' in a chain of thought (what object the model named)."""
    inner = text.split("</think>")[0]
    return inner.split("answer :")[-1].strip() if "answer :" in inner else ""


def _evaluate(
    model: Any,
    processor: Any,
    examples: list[dict[str, Any]],
    *,
    teacher_forced: bool,
    max_new_tokens: int,
    batch_size: int = 32,
) -> tuple[dict[str, Any], float | None]:
    """Per-family metrics on held-out examples (the CLI's `eval`), plus, end to end, the share
    of completions whose answer phrase names the gold object."""
    from ..cli.commands import evaluate_rows

    run = evaluate_rows(
        model,
        processor,
        examples,
        teacher_forced=teacher_forced,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=False,
    )
    summary = {"table": run.metrics.to_table(), **run.metrics.to_dict()}
    if teacher_forced:
        return summary, None
    hits = sum(
        _answer_phrase(sample["text"]) == _answer_phrase(examples[sample["index"]]["response"])
        for sample in run.samples
    )
    return summary, hits / len(run.samples) if run.samples else None


def _time_limit_callback(deadline: float) -> Any:
    from transformers import TrainerCallback

    class StopAtDeadline(TrainerCallback):
        """Stop training when the wall-clock budget of the stage is used up."""

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if time.time() > deadline:
                control.should_training_stop = True
            return control

    return StopAtDeadline()


def _time_progress_callback(deadline: float, description: str, disable: bool = False) -> Any:
    """A progress bar over the wall-clock budget of a stage (its step count is not known in
    advance when training runs until a deadline), with the latest loss."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class TimeProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.start = time.time()
            total = max(int(round(deadline - self.start)), 1)
            self.bar = tqdm(total=total, desc=description, unit="s", disable=disable)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            done = min(int(time.time() - self.start), self.bar.total)
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(step=state.global_step, refresh=False)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                self.bar.set_postfix(step=state.global_step, loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.bar.close()

    return TimeProgress()


def _time_schedule_callback(deadline: float, warmup_steps: int, min_ratio: float = 0.1) -> Any:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_ratio` over the wall-clock
    time left until `deadline`, applied to every parameter group's learning rate.

    A step-based schedule needs the step count up front; measured from a probe step, it is
    wrong whenever the machine's load changes during training (a run planned on a busy
    machine ended its schedule, and stopped, at a fifth of its budget). Scheduling on time
    spends the whole budget at whatever speed the machine gives. Use it with a constant
    scheduler and a large `max_steps`, and the deadline callback to stop.
    """
    import math

    from transformers import TrainerCallback

    class TimeCosineSchedule(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
            self.base = [group["lr"] for group in optimizer.param_groups]
            self.cosine_start = None

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
            now = time.time()
            if state.global_step < warmup_steps:
                factor = (state.global_step + 1) / warmup_steps
            else:
                if self.cosine_start is None:
                    self.cosine_start = now
                span = max(deadline - self.cosine_start, 1e-6)
                done = min(max((now - self.cosine_start) / span, 0.0), 1.0)
                factor = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * done))
            for group, base in zip(optimizer.param_groups, self.base):
                group["lr"] = base * factor
            self.factor = factor

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs is not None and "learning_rate" in logs:
                logs["learning_rate"] = self.base[0] * getattr(self, "factor", 1.0)

    return TimeCosineSchedule()


def run_demo(
    output_dir: str | Path,
    *,
    minutes: float = 14.0,
    seed: int = 0,
    quick: bool = False,
    threads: int | None = 1,
    cot_style: str = "scene_first",
) -> DemoSummary:
    """Run the embedded default end to end within about `minutes` of wall time.

    Args:
        output_dir: where every artefact goes (created).
        minutes: total budget; VLM pretraining gets 22%, the supervised warm-up 52%, GRPO
            18% (`STAGE_ENDS`).
        seed: seeds the synthetic world, the model and the training.
        quick: a reduced-size smoke run (tiny data, a few steps) for tests.
        threads: torch threads (default 1; None leaves torch's default). Measured on 2
            shared cores: 2.1 warm-up steps/s with 1 thread against 0.11-0.32 with 2 threads
            while another process used a core (threads spin-waiting for a busy core); the
            earlier 2-thread runs reached about 1.7 steps/s even on an idle machine.
        cot_style: the gold chain of thought of the synthetic world
            (`SyntheticWorldConfig.cot_style`): "scene_first" (default: the VLM first
            describes the scene, as in its pretraining, then reasons over that text) or
            "focused" (straight to the relevant shapes; docs/results.md compares them).
    """
    from transformers import set_seed

    from ..assembly.tokenizer_builder import build_tiny_tokenizer
    from ..configuration_segcompass import SegCompassConfig
    from ..data.collator import SegCompassCollator
    from ..data.synthetic import (
        SyntheticWorldConfig,
        as_mask_array,
        balanced_examples,
        describe_example,
        generate_examples,
        iter_texts,
    )
    from ..modeling_segcompass import SegCompassForReasoningSegmentation
    from ..processing_segcompass import SegCompassProcessor

    if minutes <= 0:
        raise ValueError(f"run_demo: minutes must be > 0, got {minutes!r}.")
    start = time.time()
    budget = minutes * 60.0
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    set_seed(seed)
    summary = DemoSummary(output_dir=str(out), wall_time_s=0.0)
    stage_start = time.time()

    def stage(name: str) -> None:
        nonlocal stage_start
        now = time.time()
        summary.stage_times_s[name] = round(now - stage_start, 1)
        stage_start = now
        logger.info("demo: %s done (%.0f s)", name, now - start)

    # 1. data and tokenizer
    num_train = 200 if quick else 6000
    per_family_held_out = 2 if quick else 40
    world = SyntheticWorldConfig(seed=seed, cot_style=cot_style)
    train = generate_examples(world, num_train)
    held_out = balanced_examples(
        SyntheticWorldConfig(seed=seed + 1000, cot_style=cot_style), per_family_held_out
    )
    summary.num_train, summary.num_held_out = len(train), len(held_out)
    tokenizer = build_tiny_tokenizer(
        list(iter_texts(world, min(num_train, 3000), descriptions=True)),
        vocab_size=1024,
        save_dir=out / "tokenizer",
    )
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=world.num_slots)
    # Room for the longest gold response and a few tokens more (DEMO_PROBE.md: a response
    # cut short silently scores 0).
    longest = max(map(len, tokenizer([ex["response"] for ex in train + held_out])["input_ids"]))
    max_new_tokens = max(64, longest + 8)
    stage("data")

    # 2. tiny model
    torch.manual_seed(seed)
    config = SegCompassConfig.tiny(vocab_size=len(tokenizer), num_slots=world.num_slots)
    model = SegCompassForReasoningSegmentation(config)
    collator = SegCompassCollator(processor)
    batch_size = 8 if quick else 32

    # 3. VLM pretraining: the from-scratch tiny VLM learns to read images by describing them
    # (a real backbone arrives pretrained); LM loss only, so steps are cheap.
    from ..training.vlm_pretraining import image_dependence, pretrain_vlm

    vlm_report = pretrain_vlm(
        model,
        [describe_example(ex, world) for ex in train],
        processor,
        max_steps=3 if quick else 1_000_000,  # the deadline stops it
        deadline=None if quick else start + STAGE_ENDS["vlm_pretraining"] * budget,
        learning_rate=3e-3,
        warmup_steps=1 if quick else 100,
        batch_size=batch_size,
        seed=seed,
        progress=not quick,
    )
    summary.vlm_pretraining = vlm_report.to_dict()
    stage("vlm_pretraining")

    # 4. SAE pretraining on cached activations at sae_layer
    from ..training.sae_training import pretrain_sae_for_model

    sae_batches = [
        collator(train[i : i + 32])
        for i in range(0, min(len(train), 32 * (2 if quick else 20)), 32)
    ]
    sae_result = pretrain_sae_for_model(
        model,
        sae_batches,
        out / "sae",
        steps=20 if quick else 300,
        batch_size=1024,
        lr=1e-3,
        seed=seed,
        progress=False,
    )
    report = sae_result.report
    summary.sae = {
        "l0": float(report.l0),
        "fvu": float(report.fvu),
        "initial_fvu": float(report.initial_fvu),
        "dead_fraction": float(report.dead_fraction),
    }
    stage("sae_pretraining")

    # 5. supervised warm-up (plain Trainer underneath), learning rate scheduled on wall time
    from ..training.sft import ModuleLearningRates, sft_training_arguments, train_sft

    model.train()
    sft_deadline = start + STAGE_ENDS["supervised_warmup"] * budget
    sft_steps = 3 if quick else 1_000_000  # the deadline stops it; the schedule runs on time
    args = sft_training_arguments(
        str(out / "sft"),
        max_steps=sft_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=3e-3,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        save_strategy="no",
        logging_steps=50,
        seed=seed,
        disable_tqdm=True,  # the step count is open-ended: a bar over the time budget instead
        log_level="warning",
    )
    sft = train_sft(
        model,
        train,
        processor=processor,
        args=args,
        module_learning_rates=ModuleLearningRates.uniform(),
        callbacks=[
            _time_schedule_callback(sft_deadline, warmup_steps=1 if quick else 100),
            _time_limit_callback(sft_deadline),
            _time_progress_callback(sft_deadline, "supervised warm-up", disable=quick),
        ],
    )
    summary.sft_steps = int(sft.trainer.state.global_step)
    (out / "sft_log.json").write_text(json.dumps(sft.trainer.state.log_history, indent=1))
    stage("supervised_warmup")

    # 6. evaluation of the warm-up checkpoint (end to end), then GRPO
    model.eval()
    summary.image_dependence = image_dependence(
        model, held_out, processor, batch_size=batch_size
    ).to_dict()
    summary.oracle_cot_warmup, _ = _evaluate(
        model, processor, held_out, teacher_forced=True, max_new_tokens=max_new_tokens
    )
    summary.end_to_end_warmup, _ = _evaluate(
        model, processor, held_out, teacher_forced=False, max_new_tokens=max_new_tokens
    )
    stage("eval_warmup")
    from ..training.grpo_trainer import (
        SegCompassGRPOConfig,
        SegCompassGRPOTrainer,
        build_grpo_dataset,
    )

    grpo_rows = build_grpo_dataset(train[: 64 if quick else 2000], processor)
    # The learning check's run J+ (docs/grpo.md): the segmentation loss only on completions
    # that beat their group's mean reward (the confidence loss: below). On all
    # completions (the paper's recipe) the mask loss taught the mask path to disregard the
    # text, because the tiny VLM names the right object in ~15% of them (oracle-CoT fell to
    # ~0.6); policy-only kept the oracle (0.82) but its held-out gain did not repeat on a
    # second seed. 4 prompts x 8, lr 1e-4, heads x5, constant.
    grpo_args = SegCompassGRPOConfig(
        output_dir=str(out / "grpo"),
        max_steps=1 if quick else 10_000,
        per_device_train_batch_size=8 if quick else 32,
        num_generations=4 if quick else 8,
        max_completion_length=max_new_tokens,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        module_lr_multipliers={
            "codebook": 5.0,
            "slot_mapper": 5.0,
            "prompt_encoder": 5.0,
            "mask_decoder": 5.0,
        },
        seg_loss_weight=1.0,
        conf_loss_weight=0.2,
        mask_loss_completions="above_group_mean",
        # The confidence loss without the completions that did worse than their group (a
        # "none" where the gold has an object taught the head to disregard "none"): oracle-CoT
        # 0.845 -> 0.827 over GRPO against 0.832 -> 0.793 on every completion (one run each,
        # docs/results.md).
        conf_loss_completions="not_below_group_mean",
        beta=0.0,
        temperature=1.0,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=5,
        disable_tqdm=True,
        seed=seed,
    )
    grpo = SegCompassGRPOTrainer(
        model=model,
        args=grpo_args,
        train_dataset=grpo_rows,
        processing_class=processor,
        callbacks=[_time_limit_callback(start + STAGE_ENDS["grpo"] * budget)],
    )
    grpo.train()
    summary.grpo_steps = int(grpo.state.global_step)
    (out / "grpo_log.json").write_text(json.dumps(grpo.state.log_history, indent=1))
    stage("grpo")

    # 7. evaluation: oracle-CoT and end-to-end, per family
    model.eval()
    summary.oracle_cot, _ = _evaluate(
        model, processor, held_out, teacher_forced=True, max_new_tokens=max_new_tokens
    )
    summary.end_to_end, summary.answer_phrase_accuracy = _evaluate(
        model, processor, held_out, teacher_forced=False, max_new_tokens=max_new_tokens
    )
    (out / "evaluation.json").write_text(
        json.dumps(
            {
                "oracle_cot_warmup": summary.oracle_cot_warmup,
                "oracle_cot": summary.oracle_cot,
                "end_to_end_warmup": summary.end_to_end_warmup,
                "end_to_end": summary.end_to_end,
                "answer_phrase_accuracy": summary.answer_phrase_accuracy,
            },
            indent=1,
        )
    )
    stage("evaluation")

    # 8. interpretability report on a few held-out examples
    from ..interpret.explain import build_explanation_inputs, explain, write_report
    from ..interpret.labels import build_concept_labels, save_concept_labels

    labels = build_concept_labels(model, sae_batches[:4], tokenizer, top_k=5)
    labels_path = save_concept_labels(labels, out)
    shown = held_out[:: max(1, len(held_out) // 6)][:6]
    results = model.segment(
        [ex["image"] for ex in shown], [ex["instruction"] for ex in shown], processor,
        max_new_tokens=max_new_tokens,
    )  # fmt: skip
    inputs = build_explanation_inputs(
        processor,
        [ex["image"] for ex in shown],
        [ex["instruction"] for ex in shown],
        [r.text for r in results],
    )
    explanations = explain(model, inputs, tokenizer=tokenizer, concept_labels=labels)
    report_path = write_report(
        explanations,
        [ex["image"] for ex in shown],
        out / "interpretability",
        instructions=[ex["instruction"] for ex in shown],
    )
    stage("interpretability")

    # 9. Hub-ready folder, then reload it through remote code and segment a held-out image
    from ..serving.hub import export

    export_dir = out / "hub_model"
    overall = summary.end_to_end.get("overall", {})
    export(
        model,
        processor,
        export_dir,
        repo_id="local/segcompass-tiny-synthetic",
        overwrite=True,
        extra_files=[labels_path],
        datasets=[],
        evaluation={
            "gIoU": overall.get("gIoU"),
            "cIoU": overall.get("cIoU"),
            "N-acc": overall.get("N-acc"),
        },
        eval_dataset_name="synthetic reasoning-segmentation world (held-out)",
        training={
            "SFT steps": summary.sft_steps,
            "GRPO steps": summary.grpo_steps,
            "minutes": minutes,
        },
        toy=True,
    )
    example = held_out[0]
    example["image"].save(out / "reload_example.png")
    try:
        summary.reload_check = _reload_in_fresh_process(
            export_dir, out / "reload_example.png", example["instruction"], max_new_tokens
        )
    except (RuntimeError, OSError, ValueError) as error:
        # Keep what the run measured: the summary records the failure, then the demo fails.
        summary.reload_check = {"ok": False, "error": str(error)}
        summary.wall_time_s = round(time.time() - start, 1)
        _write_summary(summary, out)
        raise
    summary.reload_check["ok"] = True
    gt = as_mask_array(example["masks"], example["image"].size[1]).astype(bool).any(0)
    pred = np.asarray(summary.reload_check.pop("mask"), dtype=bool)
    union = np.logical_or(pred, gt).sum()
    summary.reload_check["iou"] = (
        round(float(np.logical_and(pred, gt).sum() / union), 3) if union else 1.0
    )
    _save_overlay(example["image"], pred, out / "reloaded_prediction.png")
    stage("export_and_reload")

    summary.files = {
        "evaluation": str(out / "evaluation.json"),
        "interpretability_report": str(report_path),
        "hub_model": str(export_dir),
        "concept_labels": str(labels_path),
        "reloaded_prediction": str(out / "reloaded_prediction.png"),
    }
    summary.files["summary"] = str(out / "summary.md")
    summary.wall_time_s = round(time.time() - start, 1)
    _write_summary(summary, out)
    return summary


def _write_summary(summary: DemoSummary, out: Path) -> None:
    """summary.json (every figure) and summary.md (what the CLI prints) in the output folder."""
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1, default=str))
    (out / "summary.md").write_text(summary.to_text() + "\n", encoding="utf-8")


_RELOAD_SCRIPT = """
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_segcompass" or name.startswith("modeling_segcompass."):
            raise ImportError("the package is deliberately hidden: this is what a Hub user has")

sys.meta_path.insert(0, Block())
import numpy as np
from PIL import Image
from transformers import AutoModel, AutoProcessor

folder, image_path, instruction, max_new_tokens = sys.argv[1:5]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
(result,) = model.segment(Image.open(image_path), instruction, processor,
                          max_new_tokens=int(max_new_tokens))
mask = result.masks.numpy().any(0) if len(result.masks) else np.zeros(Image.open(image_path).size[::-1], bool)
print(json.dumps({"class_module": type(model).__module__, "instruction": instruction,
                  "text": result.text, "num_masks": int(len(result.masks)),
                  "reason": result.reason, "mask": mask.tolist()}))
"""


def _reload_in_fresh_process(
    folder: Path, image_path: Path, instruction: str, max_new_tokens: int
) -> dict[str, Any]:
    """Load the exported folder with AutoModel(trust_remote_code=True) where the package
    cannot be imported, and segment one image there."""
    import os
    import subprocess
    import sys

    # The child runs in `folder` (so the package in the caller's working directory cannot be
    # imported from there), so relative paths must be made absolute first: a relative folder
    # name that names no folder from the child's directory is taken for a Hub repo id.
    folder, image_path = Path(folder).resolve(), Path(image_path).resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"demo: {folder} holds no config.json; export the model there before reloading it."
        )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    done = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(folder), str(image_path), instruction,
         str(max_new_tokens)],
        cwd=str(folder), env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(
            "demo: reloading the exported folder in a fresh process failed:\n" + done.stderr[-3000:]
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _save_overlay(image: Any, mask: np.ndarray, path: Path) -> None:
    """Image with the predicted mask tinted red, upscaled x4 for viewing."""
    from PIL import Image

    array = np.asarray(image.convert("RGB")).astype(np.float32)
    tint = np.array([255.0, 0.0, 0.0])
    array[mask] = 0.5 * array[mask] + 0.5 * tint
    picture = Image.fromarray(array.clip(0, 255).astype(np.uint8))
    picture.resize((picture.width * 4, picture.height * 4), Image.NEAREST).save(path)


__all__ = ["DemoSummary", "run_demo"]
