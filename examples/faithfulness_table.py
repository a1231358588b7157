"""Do the demo models' named concepts carry their masks? One table over several demo runs.

    python examples/faithfulness_table.py --run dense:0:/tmp/dense_s0 --run dense:1:/tmp/dense_s1 \\
        --run pairs8:0:/tmp/sparse_s0 --out faithfulness.json

Each ``--run NAME:SEED:DIR`` is a finished demo folder (``segcompass demo --seed SEED``; its
``hub_model/``, ``concept_labels.json`` and ``summary.json``). The held-out rows are rebuilt
as the demo builds them (the synthetic world of seed SEED + 1000, ``--per-family`` rows per
family, gold reasoning teacher-forced). For every slot matched to a target and holding a
mask: the mask change when its top-8 concepts are removed (explained order, raw-weight order)
against 8 random active concepts, the deletion-curve areas (k = 1..16) and their ratio, and
the purity of its top-8 concepts per family. Accuracy (end-to-end and oracle-CoT gIoU over
the demo's full held-out set) comes from the run's ``summary.json``. Prints one markdown
table per readout (mean over the seeds) and one row per run, writes all numbers as JSON,
and with ``--plot`` the mean deletion curves as a PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from modeling_segcompass import SegCompassForReasoningSegmentation
from modeling_segcompass.data.synthetic import SyntheticWorldConfig, balanced_examples
from modeling_segcompass.interpret.faithfulness import faithfulness_study
from modeling_segcompass.interpret.labels import (
    concepts_in_words,
    load_concept_labels,
    synthetic_vocabulary,
)
from modeling_segcompass.processing_segcompass import SegCompassProcessor

FAMILIES_FOR_PURITY = ("attribute", "relation", "superlative")


def measure(name: str, seed: int, folder: Path, args: argparse.Namespace) -> dict:
    model = SegCompassForReasoningSegmentation.from_pretrained(folder / "hub_model").eval()
    processor = SegCompassProcessor.from_pretrained(folder / "hub_model")
    words = concepts_in_words(load_concept_labels(folder), synthetic_vocabulary())
    summary = json.loads((folder / "summary.json").read_text())
    rows = balanced_examples(
        SyntheticWorldConfig(seed=seed + 1000, cot_style=args.cot_style), args.per_family
    )
    start = time.time()
    study = faithfulness_study(
        model,
        rows,
        processor,
        words=words,
        random_draws=args.random_draws,
        seed=seed,
        method=args.method,
    )
    result = {
        "name": name,
        "seed": seed,
        "folder": str(folder),
        "readout_pairs": model.config.codebook_readout_pairs,
        "ref_input": getattr(model.config, "slot_mapper_ref_input", True),
        "end_to_end_gIoU": summary["end_to_end"]["overall"]["gIoU"],
        "oracle_cot_gIoU": summary["oracle_cot"]["overall"]["gIoU"],
        "seconds": time.time() - start,
        **study.to_dict(),
    }
    logging.info("%s seed %d: %.0f s", name, seed, result["seconds"])
    return result


def row_values(r: dict) -> dict[str, float]:
    fam = r["families"]
    alls = fam["all"]
    out = {
        "e2e": r["end_to_end_gIoU"],
        "oracle": r["oracle_cot_gIoU"],
        "top8": alls["change_at_8"]["attribution"],
        "top8_weight": alls["change_at_8"]["weight"],
        "rand8": alls["change_at_8"]["random"],
        "area": alls["area"]["attribution"],
        "area_random": alls["area"]["random"],
        "ratio": alls["area_ratio"]["attribution"],
        "slots": alls["num_slots"],
    }
    for f in FAMILIES_FOR_PURITY:
        out[f"purity_{f}"] = fam[f]["purity"]["attribution"] if f in fam else float("nan")
    return out


HEADER = (
    "| readout | seeds | end-to-end gIoU | oracle-CoT gIoU | top-8 removed (1 - IoU) | "
    "top-8 by raw weight | 8 random | deletion area | random area | ratio | purity attribute "
    "| purity relation | purity superlative | slots |"
)


def format_row(label: str, values: list[dict[str, float]], seeds: str) -> str:
    def cell(key: str, fmt: str = "{:.3f}") -> str:
        data = [v[key] for v in values]
        mean = float(np.nanmean(data))
        if len(data) > 1:
            return (fmt + " ± " + fmt).format(mean, float(np.nanstd(data)))
        return fmt.format(mean)

    keys = ["e2e", "oracle", "top8", "top8_weight", "rand8", "area", "area_random"]
    cells = [cell(k) for k in keys] + [cell("ratio", "{:.1f}")]
    cells += [cell(f"purity_{f}", "{:.2f}") for f in FAMILIES_FOR_PURITY]
    cells.append(str(int(sum(v["slots"] for v in values))))
    return f"| {label} | {seeds} | " + " | ".join(cells) + " |"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in results:
        groups[r["name"]].append(r["families"]["all"]["mean_iou"])
    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=90)
    for (name, curves), colour in zip(groups.items(), ("tab:blue", "tab:orange", "tab:green")):
        ks = np.arange(1, len(curves[0]["attribution"]) + 1)
        for order, style in (("attribution", "-"), ("random", ":")):
            mean = np.mean([c[order] for c in curves], axis=0)
            ax.plot(ks, mean, style, color=colour, label=f"{name}, {order} order")
    ax.set_xlabel("concepts removed (k)")
    ax.set_ylabel("mask IoU with the unedited mask")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="NAME:SEED:DIR")
    parser.add_argument("--per-family", type=int, default=10)
    parser.add_argument("--random-draws", type=int, default=3)
    parser.add_argument("--cot-style", default="scene_first")
    parser.add_argument(
        "--method", default="occlusion", choices=["occlusion", "integrated_gradients"]
    )
    parser.add_argument("--out", type=Path, default=Path("faithfulness.json"))
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    results = []
    for spec in args.run:
        name, seed, folder = spec.split(":", 2)
        results.append(measure(name, int(seed), Path(folder), args))
        args.out.write_text(json.dumps(results, indent=1))
    print(HEADER)
    print("|" + "---|" * 15)
    groups = defaultdict(list)
    for r in results:
        groups[r["name"]].append(r)
    for name, runs in groups.items():
        seeds = ",".join(str(r["seed"]) for r in runs)
        print(format_row(name, [row_values(r) for r in runs], seeds))
    for r in results:
        print(format_row(f"{r['name']} seed {r['seed']}", [row_values(r)], str(r["seed"])))
    if args.plot is not None:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
