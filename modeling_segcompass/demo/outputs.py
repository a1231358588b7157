"""The demo's last stages on rank 0: the interpretability report, then the Hub-ready folder,
reloaded through remote code in a fresh process (`run.STAGES`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .reload import reload_in_fresh_process, save_overlay
from .summary import write_summary

if TYPE_CHECKING:
    from .run import DemoState


def interpretability_report(state: DemoState) -> None:
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


def export_and_reload(state: DemoState) -> None:
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


__all__ = ["export_and_reload", "interpretability_report"]
