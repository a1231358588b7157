"""Why this mask? Train a tiny SegCompass briefly, then trace, ablate and report its concepts.

    python examples/explain_example.py --steps 300 --out explain_out
    python examples/explain_example.py --model demo_output/hub_model --out explain_demo

With `--model`, a trained model folder (e.g. the demo's Hub-ready folder) is explained
instead of training one.

Steps: build the synthetic world and its tokenizer, train the tiny model with its own
loss (LM + segmentation) for `--steps` AdamW steps, scan concept labels over training
examples, then on held-out examples: `explain`, `concept_ablation_study`,
`rank_concepts_by_effect`, `concept_quality_vs_accuracy`, and a static HTML report
(``OUT/report/index.html``) plus a JSON concept trace (``OUT/trace.json``), a picture of
one slot's heatmap and mask with its top concepts and with random ones removed
(``OUT/report/ablation_0.png``), and the trained model (``OUT/model``).
Everything runs on CPU without downloads.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
from modeling_segcompass.data.collator import SegCompassCollator
from modeling_segcompass.data.synthetic import SyntheticWorldConfig, generate_examples, iter_texts
from modeling_segcompass.interpret.ablation import (
    ablate_concepts,
    concept_ablation_study,
    rank_concepts_by_effect,
)
from modeling_segcompass.interpret.explain import explain
from modeling_segcompass.interpret.labels import build_concept_labels, save_concept_labels
from modeling_segcompass.interpret.quality import concept_quality_vs_accuracy
from modeling_segcompass.interpret.render import (
    plot_quality_vs_accuracy,
    render_ablation,
    write_report,
)
from modeling_segcompass.processing_segcompass import SegCompassProcessor

logger = logging.getLogger("explain_example")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-explain", type=int, default=4)
    parser.add_argument("--num-eval", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("explain_out"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model", type=Path, default=None,
        help="explain this trained model folder (config + weights + processor) instead of "
        "training one; the synthetic world must be the one it was trained on (--seed)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    world = SyntheticWorldConfig(seed=args.seed)
    if args.model is not None:
        from modeling_segcompass.cli.commands import load_model

        loaded = load_model(str(args.model), device="cpu")
        model, processor = loaded.model, loaded.processor
        tokenizer = processor.tokenizer
        args.steps = 0
    else:
        tokenizer = build_tiny_tokenizer(list(iter_texts(world, 2000)), vocab_size=1024)
        processor = SegCompassProcessor.tiny(tokenizer, num_slots=world.num_slots)
        config = SegCompassConfig.tiny(vocab_size=len(tokenizer), num_slots=world.num_slots)
        model = SegCompassForReasoningSegmentation(config)
    collator = SegCompassCollator(processor)

    # ---- a short supervised run (the model's own loss: LM + segmentation + confidence)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01
    )
    model.train()
    start = time.time()
    for step in range(args.steps):
        rows = generate_examples(world, args.batch_size, start=step * args.batch_size)
        loss = model(**collator(rows), compute_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            logger.info("step %d  loss %.3f  (%.0f s)", step, loss.item(), time.time() - start)
    model.eval()

    # ---- concept labels over training examples, saved as the model's side file
    scan = [collator(generate_examples(world, 16, start=i * 16)) for i in range(8)]
    labels = build_concept_labels(model, scan, tokenizer, top_k=10)
    args.out.mkdir(parents=True, exist_ok=True)
    save_concept_labels(labels, args.out)
    model.save_pretrained(args.out / "model")
    processor.save_pretrained(args.out / "model")

    # ---- held-out examples with the gold completion (teacher-forced trace)
    held_out = generate_examples(world, args.num_eval, start=10**6)
    shown = held_out[: args.num_explain]
    inputs = processor(
        [r["image"] for r in shown],
        [r["instruction"] for r in shown],
        responses=[r["response"] for r in shown],
        masks=[r["masks"] for r in shown],
    )
    explanations = explain(model, inputs, tokenizer=tokenizer, concept_labels=labels)
    study = concept_ablation_study(model, inputs, top_n=3, random_draws=5)
    # one slot, drawn: its top-3 concepts removed vs 3 random active ones
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "sam_pixel_values")
    with torch.no_grad():
        output = model(**{k: inputs[k] for k in keys}, compute_logits=False)
    record = study.records[0]
    active = output.concept_indices[record.sample][output.concept_values[record.sample] > 0]
    pool = sorted(set(active.tolist()) - set(record.top_concepts))
    rows = inputs["input_ids"].shape[0]
    random_ids = np.random.default_rng(args.seed).choice(pool, 3, replace=False).tolist()
    edits = {
        "top-3 removed": ablate_concepts(
            model, inputs, [record.top_concepts if b == record.sample else [] for b in range(rows)]
        ),
        "3 random removed": ablate_concepts(
            model, inputs, [random_ids if b == record.sample else [] for b in range(rows)]
        ),
    }
    render_ablation(
        output, edits, record.sample, record.slot, args.out / "report" / "ablation_0.png",
        image=shown[record.sample]["image"],
        title=f"{shown[record.sample]['instruction']} (slot {record.slot})",
    )  # fmt: skip
    ranking = rank_concepts_by_effect(model, inputs, max_candidates=16, concept_labels=labels)
    quality = concept_quality_vs_accuracy(model, held_out, processor, concept_labels=labels)
    quality.plot_path = plot_quality_vs_accuracy(
        quality, args.out / "report" / "quality_vs_accuracy.png"
    )
    index = write_report(
        explanations,
        [r["image"] for r in shown],
        args.out / "report",
        instructions=[r["instruction"] for r in shown],
        ablation_study=study,
        quality=quality,
    )
    trace = {
        "explanations": [e.to_dict() for e in explanations],
        "ablation_study": study.to_dict(),
        "ranking": [r.to_dict() for r in ranking],
        "quality": quality.to_dict(),
    }
    (args.out / "trace.json").write_text(json.dumps(trace, indent=1))
    logger.info("ablation study:\n%s", study.to_markdown())
    logger.info("quality vs accuracy:\n%s", quality.to_markdown())
    logger.info("report: %s", index)


if __name__ == "__main__":
    main()
