"""One place for tiny configs, models and batches used across the tests."""

from __future__ import annotations

import torch

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation

# Prepended to scripts run in a fresh interpreter: makes `import modeling_segcompass` fail,
# which is what a Hub user without the package has (checked by the script itself).
HIDE_PACKAGE = """
import importlib.abc
import sys


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_segcompass" or name.startswith("modeling_segcompass."):
            raise ImportError("modeling_segcompass is deliberately not importable here")
        return None


sys.meta_path.insert(0, Block())
try:
    import modeling_segcompass  # noqa: F401
    raise SystemExit("the block did not work")
except ImportError:
    pass
"""

# ids of the tiny tokenizer layout (tokenizer_builder.SPECIAL_TOKENS)
PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD = 0, 1, 2, 3, 4, 5
THINK, THINK_END, REF = 7, 8, 9
IMAGE_TOKENS = 16  # 64 px, patch 8, merge 2


def force_answer(num_refs: int, word: int = 20):
    """prefix_allowed_tokens_fn making generation write `<think> word </think>`, then
    `num_refs` `<REF_POS>` and `<|im_end|>`: a well-formed answer from an untrained model.

    Stateless (it reads what the assistant turn holds so far), so one function serves calls
    with different prompt lengths. Self-contained, so tests can ship its source to a fresh
    interpreter with `inspect.getsource`.
    """
    think, think_end, ref, im_start, im_end = 7, 8, 9, 1, 2

    def allowed(batch_id, input_ids):
        ids = input_ids.tolist()
        turn = ids[len(ids) - ids[::-1].index(im_start) :]  # after the last <|im_start|>
        if think not in turn:
            return [think]
        if think_end not in turn:
            return [word] if turn[-1] == think else [think_end]
        return [ref] if turn.count(ref) < num_refs else [im_end]

    return allowed


def build_tiny_config(**overrides) -> SegCompassConfig:
    return SegCompassConfig.tiny(vocab_size=128, **overrides)


def build_tiny_model(**overrides) -> SegCompassForReasoningSegmentation:
    torch.manual_seed(0)
    return SegCompassForReasoningSegmentation(build_tiny_config(**overrides)).eval()


def make_sequence(num_refs: int, text_len: int = 6, response_len: int = 5) -> list[int]:
    """prompt with the 16 image pads, a response with `num_refs` <REF_POS> at the end."""
    prompt = [IM_START, 20, VISION_START, *[IMAGE_PAD] * IMAGE_TOKENS, VISION_END]
    prompt += list(range(30, 30 + text_len)) + [IM_END, IM_START, 21]
    response = [THINK, *range(60, 60 + response_len), THINK_END, *[REF] * num_refs, IM_END]
    return prompt + response


def make_batch(
    config: SegCompassConfig,
    refs_per_row: list[int],
    *,
    with_targets: bool = False,
    num_objects: list[int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A right-padded batch in the processor's format (random pixels, hand-made ids)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [make_sequence(n) for n in refs_per_row]
    length = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), PAD, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    patch_dim = 3 * 2 * 8 * 8
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(batch * 64, patch_dim, generator=gen),
        "image_grid_thw": torch.tensor([[1, 8, 8]] * batch),
        "sam_pixel_values": torch.randn(batch, 3, 64, 64, generator=gen),
    }
    if with_targets:
        labels = input_ids.clone()
        labels[attention_mask == 0] = -100
        for i, row in enumerate(rows):
            start = row.index(THINK)
            labels[i, :start] = -100
        size = config.mask_size
        objects = num_objects or [min(1, n) for n in refs_per_row]
        gt = torch.zeros(batch, config.num_slots, size, size)
        for i, count in enumerate(objects):
            for j in range(count):
                top = 4 + 18 * j
                gt[i, j, top : top + 14, 10 + 6 * j : 30 + 6 * j] = 1.0
        valid = torch.ones(batch, size, size, dtype=torch.bool)
        valid[:, :, size - 8 :] = False  # a padded strip, as a non-square image leaves
        out.update(
            labels=labels,
            gt_masks=gt,
            num_objects=torch.tensor(objects),
            valid_mask=valid,
        )
    return out


TINY_CORPUS = [
    "the green triangle left of the red circle",
    "the blue square above the small red circle",
    "<think> red circle at top left . answer : red circle at top left </think> <REF_POS> <REF_POS> <REF_POS>",
] * 10


def build_tiny_tokenizer_and_processor(num_slots: int = 3):
    """A tiny BPE tokenizer (special ids 0..9) and the matching SegCompassProcessor."""
    from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
    from modeling_segcompass.processing_segcompass import SegCompassProcessor

    tokenizer = build_tiny_tokenizer(TINY_CORPUS, vocab_size=400)
    return tokenizer, SegCompassProcessor.tiny(tokenizer, num_slots=num_slots)


def launch_two_cpu_processes(script: str, out_dir, timeout_s: int = 240) -> tuple[list[dict], str]:
    """Run ``script --worker OUT_DIR`` on 2 CPU processes (gloo) with ``accelerate launch``
    and return the ``rank{0,1}.json`` reports the workers write, plus the launch's logs.

    `--cpu` alone runs ONE process (accelerate's multi-CPU path needs MPI); `--multi_gpu`
    selects the torchrun launcher, and the worker's ``PartialState(cpu=True)`` makes it gloo.
    """
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.update(
        PYTHONPATH=f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        ACCELERATE_USE_CPU="true",
    )
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port),
        script, "--worker", str(out_dir),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the launcher stop its workers (each runs in a session of its own, so
        # a SIGKILL of the launcher alone would leave them waiting in a collective).
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"accelerate launch did not finish within {timeout_s} s:\n{stderr[-6000:]}")
    logs = f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}"
    assert process.returncode == 0, logs
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in (0, 1)], logs
