"""The demo's training curves: losses and rewards of every training stage in one PNG.

`collect_curves` turns what the stages left (the VLM pretraining and SAE reports, the
trainers' ``log_history``) into series; `plot_training_curves` draws one panel per stage.
matplotlib is imported only when the figure is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: (step, value) points of one curve.
Series = list[tuple[float, float]]
#: panel title -> curve name -> points.
Curves = dict[str, dict[str, Series]]

# What each trainer log key is called in the figure.
_SFT_KEYS = {"loss": "total loss", "lm_loss": "LM", "seg_loss": "segmentation",
             "conf_loss": "confidence", "sae_loss": "SAE"}  # fmt: skip
_GRPO_LOSS_KEYS = {"loss": "policy loss", "seg_loss": "segmentation", "conf_loss": "confidence"}
_GRPO_REWARD_KEYS = {"reward": "total reward", "rewards/format_reward/mean": "format reward"}


def _per_step(values: Sequence[float]) -> Series:
    return [(float(i + 1), float(v)) for i, v in enumerate(values)]


def _from_log(history: Sequence[Mapping[str, Any]], keys: Mapping[str, str]) -> dict[str, Series]:
    """Curves of ``keys`` from a trainer's ``log_history`` (entries without a key skip it)."""
    curves: dict[str, Series] = {}
    for entry in history:
        for key, label in keys.items():
            value = entry.get(key)
            if isinstance(value, (int, float)) and "step" in entry:
                curves.setdefault(label, []).append((float(entry["step"]), float(value)))
    return curves


def collect_curves(
    *,
    vlm_losses: Sequence[float] = (),
    sae_losses: Sequence[float] = (),
    sft_log: Sequence[Mapping[str, Any]] = (),
    grpo_log: Sequence[Mapping[str, Any]] = (),
) -> Curves:
    """The panels of the figure, in training order."""
    mask_reward = {
        key: "mask reward"
        for entry in grpo_log
        for key in entry
        if key.startswith("rewards/") and "mask" in key and key.endswith("/mean")
    }
    return {
        "VLM pretraining (image descriptions)": {"LM loss": _per_step(vlm_losses)},
        "SAE pretraining": {"reconstruction loss": _per_step(sae_losses)},
        "supervised warm-up": _from_log(sft_log, _SFT_KEYS),
        "GRPO losses": _from_log(grpo_log, _GRPO_LOSS_KEYS),
        "GRPO rewards": _from_log(grpo_log, {**_GRPO_REWARD_KEYS, **mask_reward}),
    }


def plot_training_curves(curves: Mapping[str, Mapping[str, Series]], path: str | Path) -> Path:
    """Draw one panel per entry of ``curves`` (x: optimiser step) and save a PNG at ``path``.

    A panel without points says so instead of staying blank.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    columns = 3
    rows = max(1, -(-len(curves) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(5.0 * columns, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (title, series) in zip(flat, curves.items()):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        drawn = False
        for label, points in series.items():
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 20 else None, markersize=3, label=label)
            drawn = True
        if drawn:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no logged values", ha="center", va="center",
                    transform=ax.transAxes, color="0.5")  # fmt: skip
    for ax in flat[len(curves) :]:
        ax.axis("off")
    figure.suptitle("SegCompass demo: training curves", fontsize=13)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


__all__ = ["Curves", "Series", "collect_curves", "plot_training_curves"]
