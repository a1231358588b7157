"""The embedded default, end to end (what `make demo` runs).

synthetic world -> local tokenizer -> tiny model -> VLM pretraining on image descriptions
-> SAE pretraining -> supervised warm-up -> GRPO -> evaluation on held-out data (oracle-CoT
and end-to-end, per family) -> interpretability report -> Hub-ready folder -> reload it with
`AutoModel(..., trust_remote_code=True)` and segment a held-out image. Everything lands in one
folder.

`run_demo` runs the stage functions of `STAGES` in order; they share one `DemoState` (the
run's settings, clock, data, model and `DemoSummary`). The wall-clock budget (`minutes`) is
split between the stages (fractions of the budget at which each training stage must end:
`STAGE_ENDS`); the learning-rate schedules run on wall time, so they end when a stage's share
does whatever the machine's speed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluation.rows import answer_phrase_accuracy, evaluate_rows
from .curves import collect_curves, plot_training_curves
from .reload import reload_in_fresh_process, save_overlay
from .schedule import time_limit_callback, time_progress_callback, time_schedule_callback
from .summary import DemoSummary, write_summary

logger = logging.getLogger(__name__)

# Fraction of the budget at which each training stage ends. The stages after GRPO
# (evaluations, report, export and reload) take about 40 s on 2 cores, 8 % of a 14-minute
# budget, so the demo ends at about 13.5 minutes, inside a 15-minute target.
STAGE_ENDS = {"vlm_pretraining": 0.22, "supervised_warmup": 0.74, "grpo": 0.92}


@dataclass
class DemoState:
    """What the stages of one demo run share.

    Attributes:
        out: the output folder.
        minutes: the wall-clock budget.
        seed: seeds the synthetic world, the model and the training.
        quick: a reduced-size smoke run.
        cot_style: the gold chain of thought of the synthetic world.
        start: ``time.time()`` at the start of the run.
        summary: what the run measured so far.
        stage_start: ``time.time()`` at the start of the current stage.
        world: the synthetic world's config; ``train`` / ``held_out`` its examples.
        tokenizer, processor: built from the world's texts.
        max_new_tokens: generation budget (the longest gold response and a few tokens more).
        model, collator, batch_size: the tiny model, its collator and training batch size.
        sae_batches: collated training batches the SAE and the concept labels read.
        labels_path, report_path, export_dir: files the later stages wrote.
        curves: the training curves so far (`curves.collect_curves` keyword arguments).
        config_overrides: fields of `SegCompassConfig.tiny` the run changes.
    """

    out: Path
    minutes: float
    seed: int
    quick: bool
    cot_style: str
    start: float
    summary: DemoSummary
    stage_start: float
    world: Any = None
    train: list[dict[str, Any]] = field(default_factory=list)
    held_out: list[dict[str, Any]] = field(default_factory=list)
    tokenizer: Any = None
    processor: Any = None
    max_new_tokens: int = 64
    model: Any = None
    collator: Any = None
    batch_size: int = 32
    sae_batches: list[Any] = field(default_factory=list)
    labels_path: Path | None = None
    report_path: Path | None = None
    export_dir: Path | None = None
    curves: dict[str, Any] = field(default_factory=dict)
    config_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def budget(self) -> float:
        """The wall-clock budget in seconds."""
        return self.minutes * 60.0

    def deadline(self, stage: str) -> float:
        """When the training stage ``stage`` must end (`STAGE_ENDS`), as a time.time()."""
        return self.start + STAGE_ENDS[stage] * self.budget

    def steps_bar(self, description: str, total: int) -> Any:
        """A progress bar over the ``total`` parts of a stage that is not a training loop."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, unit="step")

    def stage_done(self, name: str) -> None:
        """Record the time since the previous stage ended as stage ``name``'s."""
        now = time.time()
        self.summary.stage_times_s[name] = round(now - self.stage_start, 1)
        self.stage_start = now
        logger.info("demo: %s done (%.0f s)", name, now - self.start)


# =========================================================================== stages
def _prepare_data(state: DemoState) -> None:
    """The synthetic world's training and held-out examples, the tokenizer and processor."""
    from ..assembly.tokenizer_builder import build_tiny_tokenizer
    from ..data.synthetic import (
        SyntheticWorldConfig,
        balanced_examples,
        generate_examples,
        iter_texts,
    )
    from ..processing_segcompass import SegCompassProcessor

    num_train = 200 if state.quick else 6000
    per_family_held_out = 2 if state.quick else 40
    bar = state.steps_bar("data and tokenizer", 3)
    state.world = world = SyntheticWorldConfig(seed=state.seed, cot_style=state.cot_style)
    state.train = generate_examples(world, num_train)
    bar.update()
    state.held_out = balanced_examples(
        SyntheticWorldConfig(seed=state.seed + 1000, cot_style=state.cot_style),
        per_family_held_out,
    )
    bar.update()
    state.summary.num_train, state.summary.num_held_out = len(state.train), len(state.held_out)
    state.tokenizer = tokenizer = build_tiny_tokenizer(
        list(iter_texts(world, min(num_train, 3000), descriptions=True)),
        vocab_size=1024,
        save_dir=state.out / "tokenizer",
    )
    state.processor = SegCompassProcessor.tiny(tokenizer, num_slots=world.num_slots)
    bar.update()
    bar.close()
    # Room for the longest gold response and a few tokens more: a response cut short loses
    # its <REF_POS> tokens and silently scores 0.
    responses = [ex["response"] for ex in state.train + state.held_out]
    longest = max(map(len, tokenizer(responses)["input_ids"]))
    state.max_new_tokens = max(64, longest + 8)


def _build_model(state: DemoState) -> None:
    """The tiny model (seeded), its collator and the training batch size."""
    from ..configuration_segcompass import SegCompassConfig
    from ..data.collator import SegCompassCollator
    from ..modeling_segcompass import SegCompassForReasoningSegmentation

    torch.manual_seed(state.seed)
    config = SegCompassConfig.tiny(
        vocab_size=len(state.tokenizer),
        num_slots=state.world.num_slots,
        **state.config_overrides,
    )
    state.model = SegCompassForReasoningSegmentation(config)
    state.collator = SegCompassCollator(state.processor)
    state.batch_size = 8 if state.quick else 32


def _pretrain_vlm(state: DemoState) -> None:
    """VLM pretraining: the from-scratch tiny VLM learns to read images by describing them (a
    real backbone arrives pretrained); LM loss only, so steps are cheap."""
    from ..data.synthetic import describe_example
    from ..training.vlm_pretraining import pretrain_vlm

    quick = state.quick
    report = pretrain_vlm(
        state.model,
        [describe_example(ex, state.world) for ex in state.train],
        state.processor,
        max_steps=3 if quick else 1_000_000,  # the deadline stops it
        deadline=None if quick else state.deadline("vlm_pretraining"),
        learning_rate=3e-3,
        warmup_steps=1 if quick else 100,
        batch_size=state.batch_size,
        seed=state.seed,
    )
    state.summary.vlm_pretraining = report.to_dict()
    state.curves["vlm_losses"] = report.losses


def _pretrain_sae(state: DemoState) -> None:
    """SAE pretraining on cached activations at config.sae_layer."""
    from ..training.sae_training import pretrain_sae_for_model

    train = state.train
    state.sae_batches = [
        state.collator(train[i : i + 32])
        for i in range(0, min(len(train), 32 * (2 if state.quick else 20)), 32)
    ]
    result = pretrain_sae_for_model(
        state.model,
        state.sae_batches,
        state.out / "sae",
        steps=20 if state.quick else 300,
        batch_size=1024,
        lr=1e-3,
        seed=state.seed,
    )
    report = result.report
    state.curves["sae_losses"] = report.losses
    state.summary.sae = {
        "l0": float(report.l0),
        "fvu": float(report.fvu),
        "initial_fvu": float(report.initial_fvu),
        "dead_fraction": float(report.dead_fraction),
    }


def _supervised_warmup(state: DemoState) -> None:
    """Supervised warm-up (plain Trainer underneath), learning rate scheduled on wall time."""
    from ..training.sft import ModuleLearningRates, sft_training_arguments, train_sft

    quick = state.quick
    state.model.train()
    deadline = state.deadline("supervised_warmup")
    args = sft_training_arguments(
        str(state.out / "sft"),
        max_steps=3 if quick else 1_000_000,  # the deadline stops it; the schedule runs on time
        per_device_train_batch_size=state.batch_size,
        learning_rate=3e-3,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        save_strategy="no",
        logging_steps=1 if quick else 50,
        seed=state.seed,
        disable_tqdm=True,  # the step count is open-ended: a step counter with the time left
        log_level="warning",
    )
    sft = train_sft(
        state.model,
        state.train,
        processor=state.processor,
        args=args,
        module_learning_rates=ModuleLearningRates.uniform(),
        callbacks=[
            time_schedule_callback(deadline, warmup_steps=1 if quick else 100),
            time_limit_callback(deadline),
            time_progress_callback(deadline, "supervised warm-up", total=3 if quick else None),
        ],
    )
    state.summary.sft_steps = int(sft.trainer.state.global_step)
    state.curves["sft_log"] = sft.trainer.state.log_history
    (state.out / "sft_log.json").write_text(json.dumps(sft.trainer.state.log_history, indent=1))


def _held_out_scores(
    state: DemoState, *, teacher_forced: bool
) -> tuple[dict[str, Any], float | None]:
    """Per-family metrics on the held-out examples (what `segcompass eval` reports) with their
    table, and, end to end, the share of completions whose answer phrase names the gold
    object (None teacher-forced)."""
    run = evaluate_rows(
        state.model,
        state.processor,
        state.held_out,
        teacher_forced=teacher_forced,
        batch_size=32,
        max_new_tokens=state.max_new_tokens,
    )
    scores = {"table": run.metrics.to_table(), **run.metrics.to_dict()}
    if teacher_forced:
        return scores, None
    return scores, answer_phrase_accuracy(run.samples, state.held_out)


def _evaluate_warmup(state: DemoState) -> None:
    """The warm-up checkpoint: image dependence, oracle-CoT and end-to-end scores."""
    from ..training.vlm_pretraining import image_dependence

    state.model.eval()
    summary = state.summary
    summary.image_dependence = image_dependence(
        state.model, state.held_out, state.processor, batch_size=state.batch_size, progress=True
    ).to_dict()
    summary.oracle_cot_warmup, _ = _held_out_scores(state, teacher_forced=True)
    summary.end_to_end_warmup, _ = _held_out_scores(state, teacher_forced=False)


def _train_grpo(state: DemoState) -> None:
    """GRPO on the reasoning path, with the segmentation losses, until its deadline."""
    from ..training.grpo_trainer import (
        SegCompassGRPOConfig,
        SegCompassGRPOTrainer,
        build_grpo_dataset,
    )

    quick = state.quick
    rows = build_grpo_dataset(state.train[: 64 if quick else 2000], state.processor)
    args = SegCompassGRPOConfig(
        output_dir=str(state.out / "grpo"),
        max_steps=1 if quick else 10_000,
        per_device_train_batch_size=8 if quick else 32,
        num_generations=4 if quick else 8,
        max_completion_length=state.max_new_tokens,
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
        # The segmentation loss only on completions that beat their group's mean reward: on
        # every completion (the paper's recipe) it teaches the mask path to disregard the
        # text, because the tiny VLM names the right object in few of its completions
        # (docs/grpo.md).
        mask_loss_completions="above_group_mean",
        # The confidence loss without the completions that did worse than their group: a
        # "none" where the gold has an object would teach the head to disregard "none"
        # (docs/results.md).
        conf_loss_completions="not_below_group_mean",
        beta=0.0,
        temperature=1.0,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=5,
        disable_tqdm=True,
        seed=state.seed,
    )
    grpo = SegCompassGRPOTrainer(
        model=state.model,
        args=args,
        train_dataset=rows,
        processing_class=state.processor,
        callbacks=[
            time_limit_callback(state.deadline("grpo")),
            time_progress_callback(state.deadline("grpo"), "GRPO", total=1 if quick else None),
        ],
    )
    grpo.train()
    state.summary.grpo_steps = int(grpo.state.global_step)
    (state.out / "grpo_log.json").write_text(json.dumps(grpo.state.log_history, indent=1))
    state.curves["grpo_log"] = grpo.state.log_history
    plot_training_curves(collect_curves(**state.curves), state.out / "training_curves.png")


def _evaluate_final(state: DemoState) -> None:
    """Oracle-CoT and end-to-end scores after GRPO, per family; evaluation.json."""
    state.model.eval()
    summary = state.summary
    summary.oracle_cot, _ = _held_out_scores(state, teacher_forced=True)
    summary.end_to_end, summary.answer_phrase_accuracy = _held_out_scores(
        state, teacher_forced=False
    )
    (state.out / "evaluation.json").write_text(
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


def _interpretability_report(state: DemoState) -> None:
    """Concept labels and the interpretability report on a few held-out examples."""
    from ..interpret.explain import build_explanation_inputs, explain
    from ..interpret.labels import build_concept_labels, save_concept_labels
    from ..interpret.render import write_report

    model, processor, tokenizer = state.model, state.processor, state.tokenizer
    bar = state.steps_bar("interpretability report", 4)
    labels = build_concept_labels(model, state.sae_batches[:4], tokenizer, top_k=5)
    state.labels_path = save_concept_labels(labels, state.out)
    bar.update()
    shown = state.held_out[:: max(1, len(state.held_out) // 6)][:6]
    images = [ex["image"] for ex in shown]
    instructions = [ex["instruction"] for ex in shown]
    results = model.segment(images, instructions, processor, max_new_tokens=state.max_new_tokens)
    bar.update()
    inputs = build_explanation_inputs(processor, images, instructions, [r.text for r in results])
    explanations = explain(model, inputs, tokenizer=tokenizer, concept_labels=labels)
    bar.update()
    state.report_path = write_report(
        explanations, images, state.out / "interpretability", instructions=instructions
    )
    bar.update()
    bar.close()


def _pick_example(state: DemoState, candidates: int = 32) -> tuple[dict[str, Any], float]:
    """The card's and the Space's example: the first of the first ``candidates`` held-out
    samples with an object that the model segments with IoU >= 0.5 (else the best of them),
    and its IoU."""
    from ..data.synthetic import as_mask_array

    rows = [ex for ex in state.held_out[:candidates] if len(ex["masks"])] or state.held_out[:1]
    results = state.model.segment(
        [ex["image"] for ex in rows], [ex["instruction"] for ex in rows], state.processor,
        max_new_tokens=state.max_new_tokens,
    )  # fmt: skip
    scored = []
    for ex, result in zip(rows, results):
        gt = as_mask_array(ex["masks"], ex["image"].size[1]).astype(bool).any(0)
        pred = result.masks.numpy().astype(bool).any(0) if len(result.masks) else np.zeros_like(gt)
        union = np.logical_or(pred, gt).sum()
        scored.append((float(np.logical_and(pred, gt).sum() / union) if union else 1.0, ex))
        if scored[-1][0] >= 0.5:
            return ex, scored[-1][0]
    iou, ex = max(scored, key=lambda pair: pair[0])
    return ex, iou


def _export_and_reload(state: DemoState) -> None:
    """The final SAE in SAELens format, the Hub-ready folder, then reload it through remote
    code in a fresh process and segment a held-out image; the IoU with its gold mask and the
    overlay are recorded."""
    from ..data.synthetic import as_mask_array
    from ..serving.hub import export
    from ..training.sae_export import export_model_sae

    out, summary = state.out, state.summary
    bar = state.steps_bar("export and reload", 3)
    # The SAE as fine-tuning left it (SFT and GRPO move it on from its pretraining), in
    # SAELens format; it replaces the pretrained one written by the SAE stage.
    export_model_sae(state.model, out / "sae")
    bar.update()
    state.export_dir = out / "hub_model"
    example, example_iou = _pick_example(state)
    export(
        state.model,
        state.processor,
        state.export_dir,  # no repo id: the card and app.py load this folder
        example=(example["image"], example["instruction"]),
        example_note=(
            "The example is a held-out sample of the synthetic world; the exported model "
            f"segments it with IoU {example_iou:.2f}."
        ),
        max_new_tokens=state.max_new_tokens,
        overwrite=True,
        extra_files=[state.labels_path],
        datasets=[],
        evaluation=summary.end_to_end,  # every metric (T-acc too), overall and per family
        eval_dataset_name="synthetic reasoning-segmentation world (held-out)",
        training={
            "SFT steps": summary.sft_steps,
            "GRPO steps": summary.grpo_steps,
            "minutes": state.minutes,
        },
        toy=True,
    )
    bar.update()
    example["image"].save(out / "reload_example.png")
    try:
        summary.reload_check = reload_in_fresh_process(
            state.export_dir, out / "reload_example.png", example["instruction"],
            state.max_new_tokens,
        )  # fmt: skip
    except (RuntimeError, OSError, ValueError) as error:
        # Keep what the run measured: the summary records the failure, then the demo fails.
        summary.reload_check = {"ok": False, "error": str(error)}
        summary.wall_time_s = round(time.time() - state.start, 1)
        write_summary(summary, out)
        raise
    finally:
        bar.update()
        bar.close()
    summary.reload_check["ok"] = True
    gt = as_mask_array(example["masks"], example["image"].size[1]).astype(bool).any(0)
    pred = np.asarray(summary.reload_check.pop("mask"), dtype=bool)
    union = np.logical_or(pred, gt).sum()
    summary.reload_check["iou"] = (
        round(float(np.logical_and(pred, gt).sum() / union), 3) if union else 1.0
    )
    save_overlay(example["image"], pred, out / "reloaded_prediction.png")


#: The stages in order, each with the name its time is recorded under (None: its time counts
#: towards the next named stage).
STAGES: tuple[tuple[Callable[[DemoState], None], str | None], ...] = (
    (_prepare_data, "data"),
    (_build_model, None),
    (_pretrain_vlm, "vlm_pretraining"),
    (_pretrain_sae, "sae_pretraining"),
    (_supervised_warmup, "supervised_warmup"),
    (_evaluate_warmup, "eval_warmup"),
    (_train_grpo, "grpo"),
    (_evaluate_final, "evaluation"),
    (_interpretability_report, "interpretability"),
    (_export_and_reload, "export_and_reload"),
)


def _remove_empty_folders(out: Path) -> None:
    """Remove the empty folders under ``out``: the trainers create their output folders
    (sft/, grpo/) for checkpoints that the demo does not save."""
    folders = sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for folder in folders:
        if not any(folder.iterdir()):
            folder.rmdir()


def _check_config_overrides(overrides: dict[str, Any]) -> None:
    """Refuse override keys the tiny config does not have (a typo would otherwise be kept as
    an unused attribute) and the two the demo sets itself."""
    from ..configuration_segcompass import SegCompassConfig

    known = set(SegCompassConfig.tiny().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"run_demo: unknown SegCompassConfig field(s) {unknown}; the fields are listed in "
            "SegCompassConfig's docstring (e.g. codebook_dim, slot_mapper_heads)."
        )
    for key in ("vocab_size", "num_slots"):
        if key in overrides:
            raise ValueError(
                f"run_demo: config_overrides may not set {key!r}: the demo takes it from its "
                "tokenizer and synthetic world."
            )


def run_demo(
    output_dir: str | Path,
    *,
    minutes: float = 14.0,
    seed: int = 0,
    quick: bool = False,
    threads: int | None = 1,
    cot_style: str = "scene_first",
    config_overrides: dict[str, Any] | None = None,
) -> DemoSummary:
    """Run the embedded default end to end within about `minutes` of wall time.

    Args:
        output_dir: where every artefact goes (created).
        minutes: total budget; VLM pretraining gets 22%, the supervised warm-up 52%, GRPO
            18% (`STAGE_ENDS`).
        seed: seeds the synthetic world, the model and the training.
        quick: a reduced-size smoke run (tiny data, a few steps) for tests.
        threads: torch threads (default 1; None leaves torch's default). One thread is the
            fastest on a shared CPU: the tiny model's ops are too small to gain from a second
            one, and a thread spin-waiting for a core that another process holds slows every
            step by an order of magnitude.
        cot_style: the gold chain of thought of the synthetic world
            (`SyntheticWorldConfig.cot_style`): "scene_first" (default: the VLM first
            describes the scene, as in its pretraining, then reasons over that text) or
            "focused" (straight to the relevant shapes; docs/results.md compares them).
        config_overrides: fields of the tiny model's `SegCompassConfig` to change (checked
            by the config, as any other value), e.g. ``{"codebook_dim": 64}``.

    Returns:
        The `DemoSummary`, also written to summary.json and summary.md in `output_dir`.
    """
    from transformers import set_seed

    if minutes <= 0:
        raise ValueError(f"run_demo: minutes must be > 0, got {minutes!r}.")
    overrides = dict(config_overrides or {})
    _check_config_overrides(overrides)
    start = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    set_seed(seed)
    state = DemoState(
        out=out,
        minutes=minutes,
        seed=seed,
        quick=quick,
        cot_style=cot_style,
        start=start,
        summary=DemoSummary(output_dir=str(out), wall_time_s=0.0, config_overrides=overrides),
        stage_start=time.time(),
        config_overrides=overrides,
    )
    for stage, name in STAGES:
        stage(state)
        if name is not None:
            state.stage_done(name)
    _remove_empty_folders(out)

    summary = state.summary
    summary.files = {
        "evaluation": str(out / "evaluation.json"),
        "interpretability_report": str(state.report_path),
        "hub_model": str(state.export_dir),
        "concept_labels": str(state.labels_path),
        "sae_lens_sae": str(out / "sae"),
        "training_curves": str(out / "training_curves.png"),
        "reloaded_prediction": str(out / "reloaded_prediction.png"),
        "summary": str(out / "summary.md"),
    }
    summary.wall_time_s = round(time.time() - start, 1)
    write_summary(summary, out)
    return summary


__all__ = ["STAGES", "STAGE_ENDS", "DemoState", "DemoSummary", "run_demo"]
