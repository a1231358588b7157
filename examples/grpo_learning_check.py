"""Learning check (not a unit test): does GRPO after a supervised warm-up help, and does it
beat simply training the warm-up longer?

Pipeline (the embedded default of `modeling_segcompass.demo`, on steps instead of wall time):
synthetic world -> tiny tokenizer -> tiny model -> VLM pretraining on image descriptions
(``--vlm_steps``, LM loss only) -> SAE pretraining -> supervised warm-up (`train_sft`, batch
32, AdamW, cosine to 10 %). From the SAME warm-up weights two arms then run:

* **GRPO**: `SegCompassGRPOTrainer` (reward 0.3 format + 0.7 mask) for ``--grpo_steps``
  steps, with the segmentation loss (weight 1) only on the completions that beat their
  group's mean reward and the confidence loss (0.2) on all of them
  (``--mask_loss_completions above_group_mean``). On every completion (``all``, the
  paper's recipe) it lowered the held-out reward here (docs/grpo.md): the tiny VLM's
  completions mostly name the wrong object, and the loss then teaches the mask path to
  disregard the text; ``--seg_loss_weight 0 --conf_loss_weight 0`` is policy-only GRPO;
* **control**: supervised training continued (fresh AdamW, constant ``--control_lr``) for the
  same compute as the GRPO arm's training took (process CPU time, which unlike wall time
  does not depend on what else runs on a shared machine).

All three checkpoints are scored end to end (greedy `model.segment`, strict format) on the
same held-out examples (a different world seed, balanced over the 7 families): mean GRPO
reward (0.3 format + 0.7 multi-object mask score on the mask grid, exactly what the trainer
rewards) and gIoU (per-sample IoU of the union of the kept masks vs the union of the targets
at the image size; empty vs empty = 1). Differences are paired (same examples): mean, standard
error and a paired bootstrap 95 % CI.

    OMP_NUM_THREADS=1 PYTHONPATH=. python examples/grpo_learning_check.py --cache_dir /tmp/lc

About 15 min with the defaults while another job used the second core (VLM pretraining 1,200
steps 233 s, SAE 6 s, warm-up 700 steps 404 s, GRPO 100 steps 128 s, control 126 s CPU,
evaluations ~4 s each). Measured results and what was tried: docs/grpo.md, "Learning check".

``--cache_dir DIR`` stores the warm-up (weights + its evaluation) and reuses it on the next
run with the same data/warm-up arguments, for tuning the GRPO arm (``--skip_control``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, set_seed

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer, load_tokenizer
from modeling_segcompass.data.collator import SegCompassCollator
from modeling_segcompass.data.synthetic import (
    FAMILIES,
    SyntheticWorldConfig,
    balanced_examples,
    describe_example,
    generate_examples,
    iter_texts,
)
from modeling_segcompass.evaluation.metrics import SegmentationMetrics
from modeling_segcompass.evaluation.rows import answer_phrase
from modeling_segcompass.processing_segcompass import SegCompassProcessor
from modeling_segcompass.training.grpo_trainer import (
    SegCompassGRPOConfig,
    SegCompassGRPOTrainer,
    build_grpo_dataset,
    grpo_row,
)
from modeling_segcompass.training.rewards import score_completion
from modeling_segcompass.training.sae_training import pretrain_sae_for_model
from modeling_segcompass.training.sft import ModuleLearningRates, sft_training_arguments, train_sft
from modeling_segcompass.training.vlm_pretraining import image_dependence, pretrain_vlm

logger = logging.getLogger("grpo_learning_check")


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: Any, processor: Any, examples: list[dict[str, Any]], *, max_new_tokens: int,
    batch_size: int = 32,
) -> dict[str, list]:  # fmt: skip
    """Per-sample scores of greedy end-to-end completions.

    Returns:
        ``{"reward": [...], "format": [...], "mask": [...], "iou": [...], "family": [...],
        "answer_ok": [...]}``, one entry per example, in order. ``reward`` is what the GRPO
        trainer would give the completion (format 0.3 + multi-object mask score 0.7, computed
        on the (K, M, M) mask logits of the same forward `segment` runs); ``iou`` is the
        per-sample IoU behind gIoU (kept masks at the image size, strict format).
    """
    model.eval()
    pad_id = processor.tokenizer.pad_token_id
    out: dict[str, list] = {k: [] for k in ("reward", "format", "mask", "iou", "family",
                                             "answer_ok")}  # fmt: skip
    metrics = SegmentationMetrics(empty_iou=1.0)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        images = [ex["image"] for ex in chunk]
        instructions = [ex["instruction"] for ex in chunk]
        results = model.segment(images, instructions, processor, max_new_tokens=max_new_tokens)
        # The reward forward: the layout `segment` used (left-padded prompt, right-padded
        # completion), so the mask logits are those behind the kept masks.
        enc = processor(images=images, instructions=instructions, return_tensors="pt")
        prompt_len = enc["input_ids"].shape[1]
        prompt_lens = enc["attention_mask"].sum(1).tolist()
        completions = [r.input_ids[n:] for r, n in zip(results, prompt_lens, strict=True)]
        width = max(1, max(len(c) for c in completions))
        ids = torch.full((len(chunk), prompt_len + width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        ids[:, :prompt_len], attn[:, :prompt_len] = enc["input_ids"], enc["attention_mask"]
        for b, c in enumerate(completions):
            ids[b, prompt_len : prompt_len + len(c)] = c
            attn[b, prompt_len : prompt_len + len(c)] = 1
        fwd = model(
            input_ids=ids, attention_mask=attn, pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"], sam_pixel_values=enc["sam_pixel_values"],
            compute_logits=False,
        )  # fmt: skip
        for b, (ex, res) in enumerate(zip(chunk, results, strict=True)):
            row = grpo_row(ex, processor)
            has_ref = bool((completions[b] == processor.ref_token_id).any())
            conf = fwd.conf_logits[b].float().masked_fill(~fwd.ref_mask[b], -torch.inf)
            score = score_completion(
                res.text, fwd.mask_logits[b].float() if has_ref else None, conf,
                torch.as_tensor(row["gt_masks"]), int(row["num_objects"]),
                num_ref=processor.num_slots, valid_mask=enc["valid_mask"][b],
            )  # fmt: skip
            height, width_px = ex["image"].size[1], ex["image"].size[0]
            gt = np.asarray(ex["masks"]).reshape(-1, height, width_px).astype(np.uint8)
            sample = metrics.add(res.masks.numpy(), gt, family=ex["family"])
            out["reward"].append(score.total)
            out["format"].append(score.format)
            out["mask"].append(score.mask)
            out["iou"].append(float(sample.iou))
            out["family"].append(ex["family"])
            out["answer_ok"].append(answer_phrase(res.text) == answer_phrase(ex["response"]))
    model.train()
    return out


def paired(a: list[float], b: list[float], *, resamples: int = 10_000, seed: int = 0) -> dict:
    """Mean of b - a, its standard error and a paired bootstrap 95 % CI (same examples)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))),
            "ci95": [float(lo), float(hi)]}  # fmt: skip


def summarize(name: str, scores: dict[str, list]) -> str:
    fam = np.asarray(scores["family"])
    parts = [f"{name:<9} reward {np.mean(scores['reward']):.4f}  gIoU {np.mean(scores['iou']):.4f}"
             f"  format {np.mean(scores['format']):.3f}  answer-ok {np.mean(scores['answer_ok']):.3f}"]  # fmt: skip
    per = []
    for f in FAMILIES:
        sel = fam == f
        if sel.any():
            r = np.asarray(scores["reward"])[sel].mean()
            g = np.asarray(scores["iou"])[sel].mean()
            per.append(f"{f} {r:.3f}/{g:.3f}")
    parts.append("    per family reward/gIoU: " + ", ".join(per))
    return "\n".join(parts)


def compare(label: str, base: dict[str, list], new: dict[str, list]) -> str:
    lines = []
    for key, name in (("reward", "reward"), ("iou", "gIoU")):
        p = paired(base[key], new[key])
        lines.append(f"{label:<20} {name:<6} {p['diff']:+.4f} (SE {p['se']:.4f}, paired bootstrap "
                     f"95% CI [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}])")  # fmt: skip
    return "\n".join(lines)


def pooled_report(reports: list[dict[str, Any]]) -> str:
    """Paired differences pooled over several runs' per-sample scores (each run pairs its own
    held-out examples); a comparison uses only the runs that have both arms."""
    lines = []
    for label, base, new in (("GRPO - warm-up", "warmup", "grpo"),
                             ("control - warm-up", "warmup", "control"),
                             ("GRPO - control", "control", "grpo")):  # fmt: skip
        runs = [r for r in reports if base in r and new in r]
        if not runs:
            continue
        pooled_base = {k: sum((r[base][k] for r in runs), []) for k in ("reward", "iou")}
        pooled_new = {k: sum((r[new][k] for r in runs), []) for k in ("reward", "iou")}
        n = len(pooled_base["reward"])
        lines.append(f"{len(runs)} run(s), {n} paired examples:")
        lines.append(compare(label, pooled_base, pooled_new))
    return "\n".join(lines) if lines else "no run holds two arms to compare"


# --------------------------------------------------------------------------- helpers
class StopAfter(TrainerCallback):
    """Stop training once `seconds` of process CPU time have been used (checked per step).

    CPU time, not wall time: on a shared machine the two arms run under different loads, and
    the process's CPU time is what each arm actually got."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.start = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if time.process_time() - self.start >= self.seconds:
            control.should_training_stop = True
        return control


def held_out_set(seed: int, per_family: int) -> list[dict[str, Any]]:
    """`per_family` examples of each family from a world with a different seed."""
    return balanced_examples(SyntheticWorldConfig(seed=seed + 1000), per_family)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--seed", type=int, default=0)
    add("--train", type=int, default=6000, help="training examples (world seed --seed)")
    add("--held_out_per_family", type=int, default=30, help="x 7 families (>= 15 for >= 100)")
    add(
        "--vlm_steps",
        type=int,
        default=1200,
        help="VLM pretraining steps on image descriptions (batch 32, LM only; 0 = none)",
    )
    add("--sft_steps", type=int, default=700, help="supervised warm-up steps (batch 32)")
    add("--sft_lr", type=float, default=3e-3)
    add("--grpo_steps", type=int, default=100)
    add("--grpo_lr", type=float, default=1e-4)
    add("--grpo_multipliers", type=json.loads,
        default={"codebook": 5, "slot_mapper": 5, "prompt_encoder": 5, "mask_decoder": 5},
        help='JSON {prefix: multiplier}; \'{}\' trains everything at --grpo_lr')  # fmt: skip
    add("--beta", type=float, default=0.0)
    add("--temperature", type=float, default=1.0)
    add("--num_generations", type=int, default=8)
    add("--grpo_batch", type=int, default=32, help="completions per step (prompts x G)")
    add("--seg_loss_weight", type=float, default=1.0,
        help="mask loss on the sampled completions (0 = policy-only)")  # fmt: skip
    add("--conf_loss_weight", type=float, default=0.2,
        help="confidence loss on the sampled completions")  # fmt: skip
    add("--mask_loss_completions", default="above_group_mean", choices=("all", "above_group_mean"),
        help="which completions carry the mask loss when its weights are > 0")  # fmt: skip
    add("--conf_loss_completions", default="all", choices=("all", "not_below_group_mean"),
        help="which completions carry the confidence loss")  # fmt: skip
    add("--control_lr", type=float, default=3e-4, help="constant lr of the continued SFT")
    add("--control_seconds", type=float, default=None,
        help="control training CPU seconds (default: the GRPO arm's measured CPU time)")  # fmt: skip
    add("--skip_control", action="store_true")
    add("--skip_grpo", action="store_true")
    add("--max_new_tokens", type=int, default=64)
    add("--cache_dir", default=None, help="store / reuse the warm-up here")
    add("--output", default=None, help="write every per-sample score to this JSON file")
    add("--pool", nargs="+", default=None, metavar="JSON",
        help="only pool earlier --output files (e.g. one per seed): paired differences over "
             "all their held-out examples, then exit")  # fmt: skip
    args = parser.parse_args()
    if args.pool:
        print(pooled_report([json.loads(Path(f).read_text()) for f in args.pool]))
        return
    if args.held_out_per_family * len(FAMILIES) < 100:
        parser.error("--held_out_per_family must give >= 100 held-out examples (>= 15).")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="segcompass-grpo-check-"))

    def stamp(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    # ---- data, tokenizer, model (as run_demo)
    set_seed(args.seed)
    world = SyntheticWorldConfig(seed=args.seed)
    train = generate_examples(world, args.train)
    held_out = held_out_set(args.seed, args.held_out_per_family)
    # The cache key covers everything the warm-up depends on, the tiny config included.
    tiny = SegCompassConfig.tiny(vocab_size=1024, num_slots=world.num_slots).to_json_string()
    key = hashlib.sha1(json.dumps([args.seed, args.train, args.vlm_steps, args.sft_steps, args.sft_lr,
                                   args.held_out_per_family, args.max_new_tokens, tiny]).encode()
                       ).hexdigest()[:10]  # fmt: skip
    cache = Path(args.cache_dir) / f"warmup-{key}" if args.cache_dir else None
    if cache is not None and (cache / "done").exists():
        tokenizer = load_tokenizer(cache / "tokenizer")
    else:
        tokenizer = build_tiny_tokenizer(
            list(iter_texts(world, min(args.train, 3000), descriptions=True)),
            vocab_size=1024, save_dir=work / "tokenizer")  # fmt: skip
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=world.num_slots)
    config = SegCompassConfig.tiny(vocab_size=len(tokenizer), num_slots=world.num_slots)
    torch.manual_seed(args.seed)
    model = SegCompassForReasoningSegmentation(config)
    collator = SegCompassCollator(processor)
    stamp(f"data: {len(train)} train, {len(held_out)} held-out ({args.held_out_per_family} per "
          f"family, world seed {args.seed + 1000})")  # fmt: skip

    # ---- SAE pretraining + supervised warm-up (or the cached one)
    if cache is not None and (cache / "done").exists():
        model.load_state_dict(torch.load(cache / "model.pt", weights_only=True))
        warm = json.loads((cache / "eval.json").read_text())
        info = json.loads((cache / "info.json").read_text())
        stamp(f"warm-up loaded from {cache} ({info})")
    else:
        if args.vlm_steps:
            vlm = pretrain_vlm(model, [describe_example(ex, world) for ex in train], processor,
                               max_steps=args.vlm_steps, seed=args.seed, progress=False)  # fmt: skip
            stamp(f"VLM pretraining: {vlm.steps} steps in {vlm.seconds:.0f} s, loss "
                  f"{vlm.first_loss:.3f} -> {vlm.final_loss:.3f}")  # fmt: skip
        batches = [collator(train[i : i + 32]) for i in range(0, min(len(train), 640), 32)]
        sae = pretrain_sae_for_model(model, batches, work / "sae", steps=300, batch_size=1024,
                                     lr=1e-3, seed=args.seed, progress=False).report  # fmt: skip
        stamp(f"SAE pretraining: FVU {sae.initial_fvu:.3f} -> {sae.fvu:.3f}, L0 {sae.l0:.1f}")
        t0 = time.time()
        sft_args = sft_training_arguments(
            str(work / "sft"), max_steps=args.sft_steps, per_device_train_batch_size=32,
            learning_rate=args.sft_lr, weight_decay=0.01, warmup_steps=min(100, args.sft_steps // 10),
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
            max_grad_norm=1.0, save_strategy="no", logging_steps=100, seed=args.seed,
            disable_tqdm=True,
        )  # fmt: skip
        train_sft(model, train, processor=processor, args=sft_args,
                  module_learning_rates=ModuleLearningRates.uniform())  # fmt: skip
        info = {"vlm_steps": args.vlm_steps, "sft_steps": args.sft_steps,
                "sft_seconds": round(time.time() - t0, 1),
                "image_dependence": image_dependence(model, held_out, processor).to_dict()}  # fmt: skip
        dep = info["image_dependence"]
        stamp(f"warm-up: {args.sft_steps} steps in {info['sft_seconds']:.0f} s; held-out LM loss "
              f"{dep['loss_right_image']:.3f} with the right image, {dep['loss_other_image']:.3f} "
              "with another")  # fmt: skip
        warm = evaluate(model, processor, held_out, max_new_tokens=args.max_new_tokens)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), cache / "model.pt")
            tokenizer.save_pretrained(cache / "tokenizer")
            (cache / "eval.json").write_text(json.dumps(warm))
            (cache / "info.json").write_text(json.dumps(info))
            (cache / "done").write_text("ok")
    warm_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stamp("evaluated the warm-up")
    report = {"args": vars(args), "warmup": warm, "warmup_info": info}

    # ---- arm 1: GRPO from the warm-up
    grpo_seconds = args.control_seconds
    if not args.skip_grpo:
        grpo_args = SegCompassGRPOConfig(
            output_dir=str(work / "grpo"), max_steps=args.grpo_steps,
            per_device_train_batch_size=args.grpo_batch, num_generations=args.num_generations,
            max_completion_length=args.max_new_tokens, learning_rate=args.grpo_lr,
            lr_scheduler_type="constant", warmup_steps=0, beta=args.beta,
            temperature=args.temperature, seg_loss_weight=args.seg_loss_weight,
            conf_loss_weight=args.conf_loss_weight,
            mask_loss_completions=args.mask_loss_completions,
            conf_loss_completions=args.conf_loss_completions,
            module_lr_multipliers=args.grpo_multipliers or None, use_cpu=True, bf16=False,
            report_to=[], save_strategy="no", logging_steps=5, disable_tqdm=True, seed=args.seed,
        )  # fmt: skip
        trainer = SegCompassGRPOTrainer(
            model=model, args=grpo_args, train_dataset=build_grpo_dataset(train[:2000], processor),
            processing_class=processor,
        )  # fmt: skip
        t0, c0 = time.time(), time.process_time()
        trainer.train()
        cpu = time.process_time() - c0
        grpo_seconds = cpu if grpo_seconds is None else grpo_seconds
        log = [{k: round(v, 4) for k, v in h.items() if k in ("step", "reward", "seg_loss",
                "kl", "rewards/format_reward/mean", "rewards/multi_object_mask_reward/mean")}
               for h in trainer.state.log_history if "reward" in h]  # fmt: skip
        stamp(f"GRPO: {args.grpo_steps} steps in {time.time() - t0:.0f} s wall, {cpu:.0f} s CPU; "
              f"training log {log}")  # fmt: skip
        report["grpo"] = evaluate(model, processor, held_out, max_new_tokens=args.max_new_tokens)
        report["grpo_cpu_seconds"] = cpu
        report["grpo_log"] = log
        stamp("evaluated GRPO")
        del trainer

    # ---- arm 2: continued supervised training for the same wall time
    if not args.skip_control:
        if grpo_seconds is None:
            parser.error("--skip_grpo needs --control_seconds.")
        model.load_state_dict(warm_state)
        t0, c0 = time.time(), time.process_time()
        ctl_args = sft_training_arguments(
            str(work / "control"), max_steps=100_000, per_device_train_batch_size=32,
            learning_rate=args.control_lr, weight_decay=0.01, lr_scheduler_type="constant",
            max_grad_norm=1.0, save_strategy="no", logging_steps=100, seed=args.seed + 1,
            disable_tqdm=True,
        )  # fmt: skip
        ctl = train_sft(model, train, processor=processor, args=ctl_args,
                        module_learning_rates=ModuleLearningRates.uniform(),
                        callbacks=[StopAfter(grpo_seconds)])  # fmt: skip
        steps = int(ctl.trainer.state.global_step)
        stamp(f"control: {steps} SFT steps in {time.time() - t0:.0f} s wall, "
              f"{time.process_time() - c0:.0f} s CPU (budget {grpo_seconds:.0f} s CPU)")  # fmt: skip
        report["control"] = evaluate(model, processor, held_out, max_new_tokens=args.max_new_tokens)
        report["control_steps"] = steps
        stamp("evaluated the control")

    # ---- report
    print(f"\nheld-out: {len(held_out)} examples; greedy, max_new_tokens {args.max_new_tokens}")
    print(summarize("warm-up", warm))
    for arm in ("grpo", "control"):
        if arm in report:
            print(summarize(arm, report[arm]))
    if "grpo" in report:
        print(compare("GRPO - warm-up", warm, report["grpo"]))
    if "control" in report:
        print(compare("control - warm-up", warm, report["control"]))
    if "grpo" in report and "control" in report:
        print(compare("GRPO - control", report["control"], report["grpo"]))
    stamp("done")
    if args.output:
        Path(args.output).write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
