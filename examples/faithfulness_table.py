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
        orders=args.orders,
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


def row_values(r: dict, purity_order: str) -> dict[str, float]:
    fam = r["families"]
    alls = fam["all"]
    out = {
        "e2e": r["end_to_end_gIoU"],
        "oracle": r["oracle_cot_gIoU"],
        "slots": alls["num_slots"],
        "rand8": alls["change_at_8"]["random"],
        "area_random": alls["area"]["random"],
        "all_concepts": alls.get("all_concepts_removed", float("nan")),
        "no_text": alls.get("no_text", float("nan")),
    }
    for order in ("attribution", "greedy", "weight"):
        nan = float("nan")
        out[f"top8_{order}"] = alls["change_at_8"].get(order, nan)
        out[f"area_{order}"] = alls["area"].get(order, nan)
        out[f"ratio_{order}"] = alls["area_ratio"].get(order, nan)
    for f in FAMILIES_FOR_PURITY:
        out[f"purity_{f}"] = fam[f]["purity"][purity_order] if f in fam else float("nan")
    return out


COLUMNS = (
    ("end-to-end gIoU", "e2e", "{:.3f}"),
    ("oracle-CoT gIoU", "oracle", "{:.3f}"),
    ("every concept removed (1 - IoU)", "all_concepts", "{:.3f}"),
    ("concepts and REF states removed", "no_text", "{:.3f}"),
    ("top-8 removed, greedy", "top8_greedy", "{:.3f}"),
    ("top-8 removed, raw weight", "top8_weight", "{:.3f}"),
    ("8 random removed", "rand8", "{:.4f}"),
    ("deletion area, greedy", "area_greedy", "{:.3f}"),
    ("deletion area, raw weight", "area_weight", "{:.3f}"),
    ("deletion area, random", "area_random", "{:.4f}"),
    ("area ratio, greedy / random", "ratio_greedy", "{:.0f}"),
    ("purity attribute", "purity_attribute", "{:.2f}"),
    ("purity relation", "purity_relation", "{:.2f}"),
    ("purity superlative", "purity_superlative", "{:.2f}"),
)
HEADER = "| readout | seeds | " + " | ".join(c[0] for c in COLUMNS) + " | slots |"


def format_row(label: str, values: list[dict[str, float]], seeds: str) -> str:
    def cell(key: str, fmt: str) -> str:
        data = [v[key] for v in values]
        mean = float(np.nanmean(data))
        if len(data) > 1:
            return (fmt + " ± " + fmt).format(mean, float(np.nanstd(data)))
        return fmt.format(mean)

    cells = [cell(key, fmt) for _, key, fmt in COLUMNS]
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
        ks = np.arange(1, len(curves[0]["random"]) + 1)
        for order, style in (("weight", "-"), ("greedy", "--"), ("random", ":")):
            if order not in curves[0]:
                continue
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
    parser.add_argument("--run", action="append", default=[], help="NAME:SEED:DIR")
    parser.add_argument("--per-family", type=int, default=6)
    parser.add_argument("--random-draws", type=int, default=2)
    parser.add_argument("--cot-style", default="scene_first")
    parser.add_argument(
        "--method", default="occlusion", choices=["occlusion", "integrated_gradients"]
    )
    parser.add_argument("--out", type=Path, default=Path("faithfulness.json"))
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument(
        "--orders", nargs="+", default=["greedy", "weight"],
        choices=["greedy", "weight", "attribution"],
        help="explained orders: greedy gradient re-attribution, raw slot weight, integrated "
        "gradients (attribution)",
    )  # fmt: skip
    parser.add_argument(
        "--purity-order", default="weight", choices=["greedy", "attribution", "weight"],
        help="the order whose first 8 concepts the purity columns score",
    )  # fmt: skip
    parser.add_argument(
        "--from-json", type=Path, nargs="*", default=None,
        help="print the table of earlier --out files instead of measuring",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    results = [r for path in args.from_json or [] for r in json.loads(path.read_text())]
    for spec in args.run:
        name, seed, folder = spec.split(":", 2)
        results.append(measure(name, int(seed), Path(folder), args))
        args.out.write_text(json.dumps(results, indent=1))
    print(HEADER)
    print("|" + "---|" * (len(COLUMNS) + 3))
    groups = defaultdict(list)
    for r in results:
        groups[r["name"]].append(r)
    for name, runs in groups.items():
        seeds = ",".join(str(r["seed"]) for r in runs)
        print(format_row(name, [row_values(r, args.purity_order) for r in runs], seeds))
    for r in results:
        values = [row_values(r, args.purity_order)]
        print(format_row(f"{r['name']} seed {r['seed']}", values, str(r["seed"])))
    if args.plot is not None:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
