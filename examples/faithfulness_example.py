"""One worked example: remove a slot's 8 named concepts and watch its mask go (a picture).

    python examples/faithfulness_example.py --model /tmp/sparse_s0 --seed 0 \\
        --out docs/images/interpretability_named_concepts.png

On the held-out rows of a demo run (rebuilt from its seed, gold reasoning teacher-forced),
the slot of `--family` (matched to a target, holding a mask) whose mask moves most when its
8 named concepts (its top 8 by slot weight, what `explain` lists) are removed, net of what 8
random active concepts do, is drawn with `render_ablation`: heatmap (top) and mask (bottom),
unedited, with the 8 named concepts removed and with 8 random active ones removed. Its
explanation is printed in words.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from modeling_segcompass import SegCompassForReasoningSegmentation
from modeling_segcompass.data.synthetic import SyntheticWorldConfig, balanced_examples
from modeling_segcompass.interpret.ablation import ablate_concepts
from modeling_segcompass.interpret.attribution import deletion_curves
from modeling_segcompass.interpret.explain import explain
from modeling_segcompass.interpret.labels import (
    concepts_in_words,
    load_concept_labels,
    synthetic_vocabulary,
)
from modeling_segcompass.interpret.render import render_ablation
from modeling_segcompass.interpret.trace import _forward
from modeling_segcompass.processing_segcompass import SegCompassProcessor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a finished demo folder")
    parser.add_argument("--seed", type=int, required=True, help="the demo's --seed")
    parser.add_argument("--family", default="attribute")
    parser.add_argument("--rows", type=int, default=10, help="held-out rows of the family")
    parser.add_argument("--out", type=Path, default=Path("named_concepts.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = SegCompassForReasoningSegmentation.from_pretrained(args.model / "hub_model").eval()
    processor = SegCompassProcessor.from_pretrained(args.model / "hub_model")
    words = concepts_in_words(load_concept_labels(args.model), synthetic_vocabulary())
    world = SyntheticWorldConfig(seed=args.seed + 1000, cot_style="scene_first")
    rows = [r for r in balanced_examples(world, args.rows) if r["family"] == args.family]
    inputs = processor(
        [r["image"] for r in rows],
        [r["instruction"] for r in rows],
        responses=[r["response"] for r in rows],
        masks=[r["masks"] for r in rows],
    )
    output = _forward(model, inputs, targets=True)
    curves = deletion_curves(
        model, inputs, output, orders=("weight",), max_k=8, random_draws=2, seed=args.seed
    )
    net = (1 - curves.orders["weight"][:, -1]) - (1 - curves.random.mean(1)[:, -1])
    p = int(net.argmax())
    (b, k), top = curves.slots[p], curves.removed["weight"][p]
    rng = np.random.default_rng(args.seed)
    active = output.concept_indices[b][output.concept_values[b] > 0].unique().tolist()
    pool = sorted(set(active) - set(top))
    random_ids = rng.choice(pool, size=min(8, len(pool)), replace=False).tolist()
    ids = [[] for _ in rows]
    ids[b] = top
    removed = ablate_concepts(model, inputs, ids, output=output)
    ids[b] = random_ids
    random = ablate_concepts(model, inputs, ids, output=output)
    edits = {"its 8 named concepts removed": removed, "8 random active removed": random}
    title = f'"{rows[b]["instruction"]}" (slot {k})'
    render_ablation(output, edits, b, k, args.out, image=rows[b]["image"], title=title)
    explanation = explain(
        model, inputs, output, tokenizer=processor.tokenizer, words=words, top_n=8
    )[b]
    print(f"row {b}, slot {k}: {rows[b]['instruction']!r}")
    print(f"top-8 removed: 1 - IoU {float(removed.mask_change[b, k]):.3f}; "
          f"8 random: {float(random.mask_change[b, k]):.3f}")  # fmt: skip
    print(f"named concepts: {top}")
    print(explanation.to_text())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
