"""Benchmark 3: SAM mask decoding for B images x K slots, batched (this package) vs per-image loop.

Both paths run the prompt encoder on all B*K heatmaps; this package then calls SAM's mask
decoder once on B*K prompts (`SegCompassForReasoningSegmentation.decode_masks`), the
reference calls it once per image with that image's K prompts (upstream
`VLRefSegCore._forward_seg`). Two sizes of SAM's prompt encoder + mask decoder:

- "tiny": the embedded default (C 32, 16 x 16 embedding, 64 x 64 masks);
- "sam": the real SAM decoder (C 256, 64 x 64 embedding, 256 x 256 masks, as in ViT-B/L/H).

Forward (no_grad: inference and rollout scoring) and forward + backward (training).
"batched" is the default, `max_images_per_decoder_call="auto"` (images per decoder call
picked from the sizes and the device); `--images-per-call` adds fixed splits ("all" = one
call on B*K prompts). Targets: at the tiny size >= 2x the loop; at SAM's size >= 0.95x the
loop with peak memory <= 1.5x the loop's. `--profile` prints the per-op profile of both
paths (forward + backward) at each size.

    python benchmarks/bench_mask_decoding.py [--batch 8 --slots 4 --sizes tiny sam]
        [--images-per-call all 1 2 4] [--profile]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    MIB,
    Agreement,
    compare,
    interleaved_timing,
    machine_summary,
    peak_memory_bytes,
    ratio_line,
    require_agreement,
    setup,
    timing_lines,
    verdict,
)
from benchmarks.reference_path import reference_decode_masks  # noqa: E402
from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation  # noqa: E402

#: loop / batched speed-up targets per size, and the batched / loop peak memory target
TARGET_SPEEDUP = {"tiny": 2.0, "sam": 0.95}
TARGET_MEMORY = {"tiny": None, "sam": 1.5}
SIZES = ("tiny", "sam")


def build(
    size: str, batch: int, num_slots: int, device: torch.device
) -> tuple[SegCompassForReasoningSegmentation, torch.Tensor, torch.Tensor]:
    """A model with the requested SAM decoder size, random heatmaps and image embeddings.

    Returns (model, heatmap_logits (B, K, M, M), image_embeddings (B, C, E, E)).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}; got {size!r}.")
    overrides: dict = {"image_encoder_type": "none", "num_slots": num_slots}
    if size == "sam":
        overrides["sam_config"] = {}  # SamConfig defaults: SAM's prompt encoder + mask decoder
        overrides["slot_mapper_heads"] = 8
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(**overrides)).to(device)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    m, c, e = cfg.mask_size, cfg.image_embedding_channels, cfg.image_embedding_size
    heatmaps = 4 * torch.randn(batch, num_slots, m, m, generator=gen).to(device)
    embeddings = torch.randn(batch, c, e, e, generator=gen).to(device)
    return model.eval(), heatmaps, embeddings


def check_agreement(
    model: SegCompassForReasoningSegmentation,
    heatmaps: torch.Tensor,
    embeddings: torch.Tensor,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> list[Agreement]:
    """Mask logits and IoU predictions of both paths.

    Tolerance: float32; batching over B*K instead of K changes only GEMM blocking, a few ulps
    of the largest value; rtol 1e-4 of the largest magnitude is a 100x margin, while decoding a
    prompt against the wrong image changes masks by O(1).
    """
    with torch.no_grad():
        masks, iou = model.decode_masks(heatmaps, embeddings)
        ref_masks, ref_iou = reference_decode_masks(model, heatmaps, embeddings)
    return [
        compare("mask_logits", masks, ref_masks, atol=atol, rtol=rtol),
        compare("iou_scores", iou, ref_iou, atol=atol, rtol=rtol),
    ]


def _label(images_per_call: int | str | None) -> str:
    if images_per_call == "auto":
        return "batched"
    return "batched_all" if images_per_call is None else f"batched_{images_per_call}"


def _variants(
    model, heatmaps, embeddings, train: bool, chunks: list[int | None]
) -> dict[str, Callable[[], object]]:
    """`decode_masks` with each `max_images_per_decoder_call` in `chunks`, and the loop."""

    def batched(images_per_call: int | str | None):
        def run():
            model.config.max_images_per_decoder_call = images_per_call
            if not train:
                with torch.no_grad():
                    return model.decode_masks(heatmaps, embeddings)
            model.zero_grad(set_to_none=True)
            masks, iou = model.decode_masks(heatmaps, embeddings)
            (masks.mean() + iou.mean()).backward()

        return run

    def looped():
        if not train:
            with torch.no_grad():
                return reference_decode_masks(model, heatmaps, embeddings)
        model.zero_grad(set_to_none=True)
        masks, iou = reference_decode_masks(model, heatmaps, embeddings)
        (masks.mean() + iou.mean()).backward()

    variants = {_label(c): batched(c) for c in chunks}
    variants["per_image_loop"] = looped
    return variants


def run_size(
    size: str,
    batch: int,
    num_slots: int,
    device: torch.device,
    repeats: int,
    chunks: list[int | str | None] | None = None,
    profile: bool = False,
) -> dict[str, float]:
    """Time `decode_masks` ("auto", and each fixed split) against the loop.

    Returns ``{"<phase> <variant>": loop / variant, "<phase> <variant> cpu": ...}`` with phase
    "forward" or "fwd+bwd" and variant "batched" ("auto"), "batched_all" or "batched_<n>".
    """
    model, heatmaps, embeddings = build(size, batch, num_slots, device)
    cfg = model.config
    chunks = ["auto"] if chunks is None else chunks
    print(
        f"-- size {size}: C {cfg.image_embedding_channels}, E {cfg.image_embedding_size}, "
        f"masks {cfg.mask_size}, B {batch} x K {num_slots}; images per decoder call: "
        f"auto = {model.images_per_decoder_call(batch, num_slots, device)}, timed: "
        f"{[batch if c is None else c for c in chunks]}"
    )
    for c in chunks:
        model.config.max_images_per_decoder_call = c
        agreements = check_agreement(model, heatmaps, embeddings)
        for a in agreements:
            a.name = f"{a.name} ({c} images per call)"
        require_agreement(agreements)
    if profile:
        for name, fn in _variants(model, heatmaps, embeddings, True, chunks[:1]).items():
            print(f"{size} fwd+bwd per-op profile, {name}:")
            print(op_profile(fn, device))
    results = {}
    for phase, train in (("forward", False), ("fwd+bwd", True)):
        variants = _variants(model, heatmaps, embeddings, train, chunks)
        memory = {name: peak_memory_bytes(fn, device) for name, fn in variants.items()}
        # a SAM-size round takes seconds on a CPU: fewer repeats keep the run near 2-3 minutes
        rounds = repeats if size == "tiny" or device.type == "cuda" else min(repeats, 3)
        timings = interleaved_timing(variants, repeats=rounds, warmup=1, device=device)
        lines = timing_lines(timings)
        lines += [ratio_line(timings, "per_image_loop", _label(c)) for c in chunks]
        for line in lines:
            print(f"{phase} {line}")
        print(
            f"{phase} peak memory: "
            + ", ".join(f"{name} {value / MIB:.0f} MiB" for name, value in memory.items())
        )
        for c in chunks:
            name = _label(c)
            results[f"{phase} {name}"] = timings.paired_ratio("per_image_loop", name)
            results[f"{phase} {name} cpu"] = timings.paired_ratio("per_image_loop", name, cpu=True)
            results[f"{phase} {name} memory"] = memory[name] / memory["per_image_loop"]
    model.config.max_images_per_decoder_call = "auto"
    return results


def op_profile(fn: Callable[[], object], device: torch.device, rows: int = 12) -> str:
    """The `rows` operators with the most self time in one call of `fn` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    fn()  # warm
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=rows, max_name_column_width=40, max_shapes_column_width=60
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument(
        "--images-per-call",
        nargs="+",
        type=_images_per_call,
        default=[],
        help="also time decode_masks with max_images_per_decoder_call = each of these "
        "(a positive integer, or 'all' for one call on all B images)",
    )
    parser.add_argument("--profile", action="store_true", help="print per-op profiles")
    return parser.parse_args(argv)


def _images_per_call(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all'; got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    device = setup(args.threads, args.device)
    print("== benchmark 3: mask decoding, batched over B*K vs per-image loop ==")
    print(machine_summary(device))
    chunks: list[int | str | None] = ["auto", *args.images_per_call]
    results = {
        size: run_size(size, args.batch, args.slots, device, args.repeats, chunks, args.profile)
        for size in args.sizes
    }
    for size, r in results.items():
        for phase in ("forward", "fwd+bwd"):
            for c in chunks:
                name = _label(c)
                speedup, cpu, mem = (
                    r[f"{phase} {name}"],
                    r[f"{phase} {name} cpu"],
                    r[f"{phase} {name} memory"],
                )
                per_call = "all" if c is None else c
                memory_target = TARGET_MEMORY[size]
                memory_verdict = (
                    ""
                    if memory_target is None or c != "auto"
                    else " " + verdict(mem, memory_target, higher_is_better=False)
                )
                speed_verdict = (
                    verdict(speedup, TARGET_SPEEDUP[size], higher_is_better=True)
                    if c == "auto"
                    else "(a fixed split, for comparison)"
                )
                print(
                    f"RESULT mask decoding[{size}, {phase}, {per_call} images/call] speedup "
                    f"loop/batched = {speedup:.2f}x (cpu time {cpu:.2f}x) {speed_verdict}, "
                    f"memory batched/loop {mem:.2f}{memory_verdict}"
                )
    return results


if __name__ == "__main__":
    main()
