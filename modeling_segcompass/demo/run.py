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

With 2 or more cores the demo runs on 2 processes (`processes.default_processes`): every rank
runs the stages, the training stages data-parallel over the ranks (torch.distributed with
gloo, one thread each, through accelerate: the engine a GPU user scales out with), with the
same global batch sizes and wall budget; rank 0 alone evaluates, writes the report and
exports the one model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..evaluation.rows import answer_phrase_accuracy, evaluate_rows
from ..training.allocator import keep_freed_memory
from .curves import collect_curves, plot_training_curves
from .outputs import export_and_reload, interpretability_report
from .processes import (
    barrier,
    default_processes,
    launch,
    peak_memory_mb,
    replicas_identical,
)
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
        rank, world_size: this process's rank and the number of processes (1: no
            torch.distributed); the training stages split each batch over the ranks.
        fixed_steps: training stage -> optimiser steps, instead of its deadline (the stage
            benchmark times the same steps on 1 and 2 processes); num_train: training
            examples (default 6000, 200 quick).
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
    rank: int = 0
    world_size: int = 1
    fixed_steps: dict[str, int] = field(default_factory=dict)
    num_train: int | None = None

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that evaluates and writes the outputs."""
        return self.rank == 0

    @property
    def rank_batch_size(self) -> int:
        """Each rank's share of the training batch: the global batch stays `batch_size`."""
        return max(1, self.batch_size // self.world_size)

    @property
    def budget(self) -> float:
        """The wall-clock budget in seconds."""
        return self.minutes * 60.0

    def deadline(self, stage: str) -> float:
        """When the training stage ``stage`` must end (`STAGE_ENDS`), as a time.time(); none
        (far ahead) under `fixed_steps`."""
        if self.fixed_steps:
            return self.start + 1e9
        return self.start + STAGE_ENDS[stage] * self.budget

    def max_steps(self, stage: str, quick: int, default: int) -> int:
        """The stage's step limit: `fixed_steps`, else ``quick`` / ``default``."""
        return self.fixed_steps.get(stage) or (quick if self.quick else default)

    def steps_bar(self, description: str, total: int) -> Any:
        """A progress bar over the ``total`` parts of a stage that is not a training loop."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, unit="step", disable=not self.main)

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

    num_train = state.num_train or (200 if state.quick else 6000)
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
    if state.main:
        state.tokenizer = build_tiny_tokenizer(
            list(iter_texts(world, min(num_train, 3000), descriptions=True)),
            vocab_size=1024,
            save_dir=state.out / "tokenizer",
        )
    barrier()  # the other ranks load rank 0's tokenizer: one vocabulary for every replica
    if not state.main:
        from transformers import AutoTokenizer

        state.tokenizer = AutoTokenizer.from_pretrained(state.out / "tokenizer")
    tokenizer = state.tokenizer
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
    from ..assembly.tokenizer_builder import word_token_ids
    from ..configuration_segcompass import SegCompassConfig
    from ..data.collator import SegCompassCollator
    from ..modeling_segcompass import SegCompassForReasoningSegmentation

    torch.manual_seed(state.seed)
    config = SegCompassConfig.tiny(
        vocab_size=len(state.tokenizer),
        num_slots=state.world.num_slots,
        **word_token_ids(state.config_overrides, state.tokenizer),
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
        max_steps=state.max_steps("vlm_pretraining", 3, 1_000_000),  # the deadline stops it
        deadline=None if quick else state.deadline("vlm_pretraining"),
        learning_rate=3e-3,
        warmup_steps=1 if quick else 100,
        batch_size=state.rank_batch_size,
        seed=state.seed,
        progress=state.main,
    )
    state.summary.vlm_pretraining = report.to_dict()
    state.summary.steps_per_s["vlm_pretraining"] = round(
        report.steps / max(report.seconds, 1e-9), 3
    )
    state.curves["vlm_losses"] = report.losses


def _pretrain_sae(state: DemoState) -> None:
    """SAE pretraining on cached activations at config.sae_layer."""
    from ..training.sae_training import pretrain_sae_for_model

    train = state.train
    state.sae_batches = [
        state.collator(train[i : i + 32])
        for i in range(0, min(len(train), 32 * (2 if state.quick else 20)), 32)
    ]
    # Every rank trains the same SAE (same activations, same seed: about 6 s, too short to
    # gain from splitting); rank 0's is saved, and the trainers broadcast rank 0's
    # parameters when they wrap the model for data parallelism.
    seconds = time.time()
    result = pretrain_sae_for_model(
        state.model,
        state.sae_batches,
        state.out / "sae" if state.main else state.out / f".sae_rank{state.rank}",
        steps=20 if state.quick else 300,
        batch_size=1024,
        lr=1e-3,
        seed=state.seed,
        progress=state.main,
    )
    if not state.main:
        import shutil

        shutil.rmtree(state.out / f".sae_rank{state.rank}", ignore_errors=True)
    state.summary.steps_per_s["sae_pretraining"] = round(
        len(result.report.losses) / max(time.time() - seconds, 1e-9), 3
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
        # the deadline stops it; the schedule runs on time
        max_steps=state.max_steps("supervised_warmup", 3, 1_000_000),
        per_device_train_batch_size=state.rank_batch_size,
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
            time_progress_callback(
                deadline, "supervised warm-up", total=3 if quick else None, disable=not state.main
            ),
        ],
    )
    state.summary.sft_steps = int(sft.trainer.state.global_step)
    state.summary.steps_per_s["supervised_warmup"] = _steps_per_s(sft.train_output)
    state.curves["sft_log"] = sft.trainer.state.log_history
    if state.main:
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

    if not state.main:  # rank 0 evaluates; the others wait for GRPO
        barrier()
        return
    state.model.eval()
    summary = state.summary
    summary.image_dependence = image_dependence(
        state.model, state.held_out, state.processor, batch_size=state.batch_size, progress=True
    ).to_dict()
    summary.oracle_cot_warmup, _ = _held_out_scores(state, teacher_forced=True)
    summary.end_to_end_warmup, _ = _held_out_scores(state, teacher_forced=False)
    barrier()


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
        max_steps=state.max_steps("grpo", 1, 10_000),
        # the global batch (completions per step) is 8 / 32 whatever the number of ranks
        per_device_train_batch_size=(8 if quick else 32) // state.world_size,
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
            time_progress_callback(
                state.deadline("grpo"), "GRPO", total=1 if quick else None, disable=not state.main
            ),
        ],
    )
    output = grpo.train()
    summary = state.summary
    summary.grpo_steps = int(grpo.state.global_step)
    summary.steps_per_s["grpo"] = _steps_per_s(output)
    # Data parallelism's invariant, and each rank's memory (collectives: every rank).
    summary.replicas_identical = replicas_identical(state.model)
    summary.peak_memory_mb = _gather_peak_memory(state.world_size)
    state.curves["grpo_log"] = grpo.state.log_history
    if state.main:
        (state.out / "grpo_log.json").write_text(json.dumps(grpo.state.log_history, indent=1))
        plot_training_curves(collect_curves(**state.curves), state.out / "training_curves.png")


def _steps_per_s(train_output: Any) -> float:
    """Optimiser steps per second of a trainer's run (its ``TrainOutput``)."""
    runtime = float(train_output.metrics.get("train_runtime", 0.0))
    return round(train_output.global_step / runtime, 3) if runtime > 0 else 0.0


def _gather_peak_memory(world_size: int) -> dict[str, float]:
    """Every rank's peak resident memory in MiB (a collective under torch.distributed)."""
    mine = peak_memory_mb()
    if world_size == 1:
        return {"rank0": mine}
    import torch.distributed as dist

    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([mine], dtype=torch.float64))
    return {f"rank{r}": round(float(t.item()), 1) for r, t in enumerate(gathered)}


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
    (interpretability_report, "interpretability"),
    (export_and_reload, "export_and_reload"),
)

#: The stages only rank 0 runs (the others end after GRPO).
MAIN_ONLY = frozenset({"evaluation", "interpretability", "export_and_reload"})


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
    processes: int | None = None,
) -> DemoSummary:
    """Run the embedded default end to end within about `minutes` of wall time.

    Args:
        output_dir: where every artefact goes (created).
        minutes: total budget; VLM pretraining gets 22%, the supervised warm-up 52%, GRPO
            18% (`STAGE_ENDS`).
        seed: seeds the synthetic world, the model and the training.
        quick: a reduced-size smoke run (tiny data, a few steps) for tests.
        threads: torch threads of each process (default 1; None leaves torch's default). One
            thread is the fastest on a shared CPU: the tiny model's ops are too small to gain
            from a second one, and a thread spin-waiting for a core that another process
            holds slows every step by an order of magnitude. Under 2 or more processes every
            rank runs 1 thread.
        cot_style: the gold chain of thought of the synthetic world
            (`SyntheticWorldConfig.cot_style`): "scene_first" (default: the VLM first
            describes the scene, then reasons over it), "scene_marked" (the scene with each
            object's decision) or "focused" (straight to the relevant shapes; docs/results.md).
        config_overrides: fields of the tiny model's `SegCompassConfig` to change (checked
            by the config, as any other value), e.g. ``{"codebook_dim": 64}``.
        processes: data-parallel CPU processes for the training stages (gloo); None: 2 when
            2 or more cores are available to this process, else 1 (`default_processes`).
            The global batch sizes and the wall budget are the same for any number.

    Returns:
        The `DemoSummary`, also written to summary.json and summary.md in `output_dir`.
    """
    if minutes <= 0:
        raise ValueError(f"run_demo: minutes must be > 0, got {minutes!r}.")
    processes = default_processes() if processes is None else processes
    if not isinstance(processes, int) or not 1 <= processes <= 8:
        raise ValueError(
            f"run_demo: processes must be an int from 1 to 8, got {processes!r}; leave it "
            "None for 2 when 2 or more cores are available, else 1."
        )
    overrides = dict(config_overrides or {})
    _check_config_overrides(overrides)
    settings = {
        "output_dir": str(output_dir),
        "minutes": minutes,
        "seed": seed,
        "quick": quick,
        "threads": threads,
        "cot_style": cot_style,
        "config_overrides": overrides,
        "start": time.time(),  # one clock for every rank's deadlines
    }
    if processes == 1:
        return _run_rank(rank=0, world_size=1, **settings)
    launch(processes, _run_rank, **settings)
    data = json.loads((Path(output_dir) / "summary.json").read_text())
    return DemoSummary(**data)


def _run_rank(
    *,
    rank: int,
    world_size: int,
    output_dir: str,
    minutes: float,
    seed: int,
    quick: bool,
    threads: int | None,
    cot_style: str,
    config_overrides: dict[str, Any],
    start: float,
    fixed_steps: dict[str, int] | None = None,
    num_train: int | None = None,
) -> DemoSummary:
    """The stages on one rank of ``world_size`` (rank 0 alone runs the ones after GRPO and
    writes the summary). With `fixed_steps` only the training stages run, each for its
    steps (`run_training_stages`)."""
    from transformers import set_seed

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()  # on every rank, as `segcompass` commands do
    torch.set_num_threads(1 if world_size > 1 else threads or torch.get_num_threads())
    set_seed(seed)
    state = DemoState(
        out=out,
        minutes=minutes,
        seed=seed,
        quick=quick,
        cot_style=cot_style,
        start=start,
        summary=DemoSummary(
            output_dir=str(out),
            wall_time_s=0.0,
            config_overrides=config_overrides,
            processes=world_size,
        ),
        stage_start=time.time(),
        config_overrides=config_overrides,
        rank=rank,
        world_size=world_size,
        fixed_steps=dict(fixed_steps or {}),
        num_train=num_train,
    )
    for stage, name in STAGES:
        if name in MAIN_ONLY and not state.main:
            continue
        if state.fixed_steps and name in MAIN_ONLY | {"eval_warmup"}:
            continue
        stage(state)
        if name is not None:
            state.stage_done(name)
    summary = state.summary
    if not state.main:
        return summary
    if state.fixed_steps:
        summary.wall_time_s = round(time.time() - start, 1)
        write_summary(summary, out)
        return summary
    _remove_empty_folders(out)
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
    summary.peak_memory_mb["rank0"] = peak_memory_mb()
    summary.wall_time_s = round(time.time() - start, 1)
    write_summary(summary, out)
    return summary


def run_training_stages(
    output_dir: str | Path,
    *,
    processes: int,
    fixed_steps: dict[str, int],
    num_train: int = 6000,
    seed: int = 0,
) -> DemoSummary:
    """The demo's data, model and training stages only, each training stage for
    ``fixed_steps[stage]`` optimiser steps (no deadline) on ``processes`` processes, with the
    demo's batch sizes and settings: what `benchmarks/bench_demo_stages.py` times. Rank 0
    writes summary.json (steps per second per stage, peak memory per process)."""
    settings = {
        "output_dir": str(output_dir),
        "minutes": 14.0,
        "seed": seed,
        "quick": False,
        "threads": 1,
        "cot_style": "scene_first",
        "config_overrides": {},
        "start": time.time(),
        "fixed_steps": dict(fixed_steps),
        "num_train": num_train,
    }
    if processes == 1:
        return _run_rank(rank=0, world_size=1, **settings)
    launch(processes, _run_rank, **settings)
    return DemoSummary(**json.loads((Path(output_dir) / "summary.json").read_text()))


__all__ = [
    "MAIN_ONLY",
    "STAGES",
    "STAGE_ENDS",
    "DemoState",
    "DemoSummary",
    "run_demo",
    "run_training_stages",
]
