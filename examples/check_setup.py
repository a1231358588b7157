"""Does my setup work? A SegCompass dry run at the real widths, before renting GPUs.

    python examples/check_setup.py                  # Qwen2.5-VL-7B / SAM ViT-H widths, few layers
    python examples/check_setup.py --text-layers 28 --vision-blocks 32 --sam-layers 32  # full depth
    python examples/check_setup.py --preset tiny    # the same steps at toy widths (seconds)

Nothing is downloaded. In a temporary folder (or ``--workdir``) the script writes
checkpoints in the real formats at the real widths, with random weights and few layers:

* a Qwen2.5-VL-7B-Instruct-shaped VLM (`Qwen2_5_VLForConditionalGeneration.save_pretrained`,
  bfloat16): text width 3584, 28 heads / 4 KV heads, M-RoPE, untied embeddings of 152064
  rows; vision width 1280, windowed attention, merger to 3584; ``--text-layers`` decoder
  layers and ``--vision-blocks`` vision blocks; with a byte-level BPE tokenizer whose added
  tokens sit at Qwen2.5-VL's ids (``<|endoftext|>`` 151643 ... ``<|file_sep|>`` 151664), a
  Qwen-style chat template and a `Qwen2VLImageProcessor` with its default settings;
* a SAM ViT-H-shaped `SamModel` (width 1280, 16 heads, MLP 5120, 1024 px input) with
  ``--sam-layers`` encoder blocks.

Then it runs every step a training and serving run needs, once, and times it:
`SegCompassForReasoningSegmentation.from_backbones` (fresh SAE of ``--d-sae`` latents), the
processor on a 640x480 image with an instruction, a ``<think> ... </think>`` response with
four ``<REF_POS>`` and a mask, the forward with labels and masks (finite loss), backward, an
optimizer step, `model.segment` (generation forced to a well-formed answer, since random
weights never write one), `save_pretrained`, and `from_pretrained`, whose outputs must equal
the in-process model's (bit for bit by default). A table of seconds and memory per step
closes the run; a failed step stops it with a non-zero exit status naming the step.

Memory: on CUDA the peak of `torch.cuda.max_memory_allocated` per step (reset before each);
on CPU the peak resident set size during the step (Linux: VmHWM, reset before each step
through /proc/self/clear_refs; elsewhere the process-wide high-water mark `ru_maxrss`) and
the change of the resident set size over the step. The loaded checkpoints are memory-mapped
from their safetensors files, so their weights join the resident set when first read.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2TokenizerFast,
    SamConfig,
    SamModel,
)
from transformers.utils import logging as hf_logging

from modeling_segcompass import (
    SegCompassForReasoningSegmentation,
    SegCompassProcessor,
)
from modeling_segcompass.precision import default_dtype

try:  # optional: RSS through psutil where installed, else /proc/self/status
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

GIB = 1024**3

#: Qwen2.5-VL's added tokens, in id order from ``<|endoftext|>`` (151643 in the real
#: tokenizer) on, with the ``special`` flag of its tokenizer_config.json.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
ADDED_OFFSET = {token: i for i, (token, _) in enumerate(QWEN_ADDED_TOKENS)}

#: Qwen2's pre-tokenisation: contractions, letter runs, single digits, punctuation, spaces.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: A Qwen-style chat template: a default system turn, images as
#: ``<|vision_start|><|image_pad|><|vision_end|>``, generation prompt ``<|im_start|>assistant``.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

NUM_SLOTS = 4
INSTRUCTION = "the object you would use to cut the bread"
RESPONSE = "<think> the knife lies on the board </think>" + " <REF_POS>" * NUM_SLOTS
IMAGE_SIZE = (480, 640)  # (H, W)
#: Text the tokenizer's BPE merges are learnt from (the base vocabulary is then filled).
BPE_TEXTS = (
    INSTRUCTION,
    RESPONSE.replace("<REF_POS>", ""),
    "Find the object the instruction refers to and answer with <REF_POS> tokens.",
    "Output the thinking process in <think> </think> tags, then the reference tokens.",
    "You are a helpful assistant. The user shows a picture and asks a question.",
    "a red circle left of a blue square, a green triangle above the yellow star",
)


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """Widths of the checkpoints and of SegCompass's own heads."""

    # language model
    text_hidden: int
    text_intermediate: int
    text_heads: int
    text_kv_heads: int
    vocab_rows: int  # rows of the embedding / LM head (Qwen keeps spare rows)
    base_vocab: int  # BPE tokens before the added tokens: <|endoftext|> gets this id
    mrope_section: tuple[int, int, int]
    # vision tower
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    # SAM
    sam_hidden: int
    sam_heads: int
    sam_mlp: int
    sam_channels: int
    sam_image_size: int
    sam_window: int
    sam_extra: dict[str, Any] = field(default_factory=dict)  # prompt encoder / decoder
    # SegCompass
    d_sae: int = 65536
    head_overrides: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # Qwen2.5-VL-7B-Instruct and facebook/sam-vit-huge
    "real": Preset(
        text_hidden=3584,
        text_intermediate=18944,
        text_heads=28,
        text_kv_heads=4,
        vocab_rows=152064,
        base_vocab=151643,
        mrope_section=(16, 24, 24),
        vision_hidden=1280,
        vision_intermediate=3420,
        vision_heads=16,
        sam_hidden=1280,
        sam_heads=16,
        sam_mlp=5120,
        sam_channels=256,
        sam_image_size=1024,
        sam_window=14,
    ),
    # toy widths for tests: same formats, same image processor (391 image tokens at 640x480)
    "tiny": Preset(
        text_hidden=64,
        text_intermediate=128,
        text_heads=4,
        text_kv_heads=2,
        vocab_rows=384,
        base_vocab=300,
        mrope_section=(2, 3, 3),
        vision_hidden=32,
        vision_intermediate=64,
        vision_heads=2,
        sam_hidden=32,
        sam_heads=2,
        sam_mlp=64,
        sam_channels=32,
        sam_image_size=256,
        sam_window=4,
        sam_extra={
            "vision_config": {"num_pos_feats": 16},
            "prompt_encoder_config": {
                "hidden_size": 32,
                "image_size": 256,
                "patch_size": 16,
                "mask_input_channels": 16,
                "image_embedding_size": 16,
            },
            "mask_decoder_config": {
                "hidden_size": 32,
                "mlp_dim": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "iou_head_hidden_dim": 32,
            },
        },
        d_sae=256,
        head_overrides={
            "codebook_dim": 32,
            "codebook_heads": 4,
            "codebook_ffn_dim": 64,
            "slot_mapper_heads": 4,
            "slot_fuser_channels": 16,
        },
    ),
}


def global_blocks(num_blocks: int) -> list[int]:
    """Blocks with global attention: every 8th as in the 32-block towers ([7, 15, 23, 31]),
    and always the last, so that a short tower has both windowed and global blocks."""
    return sorted({i for i in range(num_blocks) if (i + 1) % 8 == 0} | {num_blocks - 1})


# --------------------------------------------------------------------------- checkpoints
def qwen_style_tokenizer(base_vocab: int) -> Qwen2TokenizerFast:
    """Byte-level BPE filled to ``base_vocab`` tokens, then Qwen2.5-VL's 22 added tokens
    at ``base_vocab`` ... ``base_vocab + 21`` (151643 ... 151664 for the real size)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if base_vocab < len(alphabet):
        raise ValueError(f"base_vocab must be >= {len(alphabet)}, got {base_vocab}.")
    trainer = BpeTrainer(
        vocab_size=min(base_vocab, len(alphabet) + 2000),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    learner = Tokenizer(BPE())
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    learner.train_from_iterator(list(BPE_TEXTS) * 8, trainer=trainer)
    learnt = json.loads(learner.to_str())["model"]
    vocab: dict[str, int] = dict(learnt["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in learnt["merges"]]
    filler = 0
    while len(vocab) < base_vocab:  # unreachable placeholders: no merge produces them
        vocab[f"<unused_{filler}>"] = len(vocab)
        filler += 1

    bpe = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = learner.pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    for token, special in QWEN_ADDED_TOKENS:  # one at a time: ids follow the list's order
        added = AddedToken(token, special=special, normalized=False)
        (bpe.add_special_tokens if special else bpe.add_tokens)([added])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
    )
    extra = [AddedToken(t, special=True, normalized=False) for t, s in QWEN_ADDED_TOKENS[1:] if s]
    tokenizer.add_special_tokens({"extra_special_tokens": extra})
    for token, offset in ADDED_OFFSET.items():
        if tokenizer.convert_tokens_to_ids(token) != base_vocab + offset:
            raise RuntimeError(f"{token!r} did not land at id {base_vocab + offset}.")
    if len(tokenizer) != base_vocab + len(QWEN_ADDED_TOKENS):
        raise RuntimeError(f"the tokenizer has {len(tokenizer)} tokens, expected more or fewer.")
    return tokenizer


def default_image_processor():
    """`Qwen2VLImageProcessor` with its default settings (min 56x56, max 1280 28x28 tiles);
    the torchvision-free twin when torchvision is missing (same numbers, same saved type)."""
    try:
        import torchvision  # noqa: F401
        from transformers import Qwen2VLImageProcessor
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as Qwen2VLImageProcessor,
        )
    return Qwen2VLImageProcessor()


def vlm_config(preset: Preset, text_layers: int, vision_blocks: int) -> Qwen2_5_VLConfig:
    base = preset.base_vocab
    text = {
        "vocab_size": preset.vocab_rows,
        "hidden_size": preset.text_hidden,
        "intermediate_size": preset.text_intermediate,
        "num_hidden_layers": text_layers,
        "num_attention_heads": preset.text_heads,
        "num_key_value_heads": preset.text_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": list(preset.mrope_section),
        },
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": text_layers,
        "attention_dropout": 0.0,
        "bos_token_id": base + ADDED_OFFSET["<|endoftext|>"],
        "eos_token_id": base + ADDED_OFFSET["<|im_end|>"],
    }
    vision = {
        "depth": vision_blocks,
        "hidden_size": preset.vision_hidden,
        "intermediate_size": preset.vision_intermediate,
        "num_heads": preset.vision_heads,
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "out_hidden_size": preset.text_hidden,
        "fullatt_block_indexes": global_blocks(vision_blocks),
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=base + ADDED_OFFSET["<|image_pad|>"],
        video_token_id=base + ADDED_OFFSET["<|video_pad|>"],
        vision_start_token_id=base + ADDED_OFFSET["<|vision_start|>"],
        vision_end_token_id=base + ADDED_OFFSET["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def sam_config(preset: Preset, sam_layers: int) -> SamConfig:
    extra = preset.sam_extra
    vision = {
        "hidden_size": preset.sam_hidden,
        "num_hidden_layers": sam_layers,
        "num_attention_heads": preset.sam_heads,
        "mlp_dim": preset.sam_mlp,
        "output_channels": preset.sam_channels,
        "image_size": preset.sam_image_size,
        "patch_size": 16,
        "window_size": preset.sam_window,
        "global_attn_indexes": global_blocks(sam_layers),
        **extra.get("vision_config", {}),
    }
    return SamConfig(
        vision_config=vision,
        prompt_encoder_config=extra.get("prompt_encoder_config"),
        mask_decoder_config=extra.get("mask_decoder_config"),
    )


def build_checkpoints(args: argparse.Namespace, preset: Preset, root: Path) -> dict[str, Any]:
    """Write the VLM (bfloat16) with tokenizer and image processor, and SAM (float32, as
    facebook/sam-vit-* ship), each with `save_pretrained`. Returns their folders and sizes."""
    vlm_dir, sam_dir = root / "qwen2.5-vl-shaped", root / "sam-vit-h-shaped"
    torch.manual_seed(args.seed)
    config = vlm_config(preset, args.text_layers, args.vision_blocks)
    with default_dtype(torch.bfloat16):
        vlm = Qwen2_5_VLForConditionalGeneration(config)
    vlm.save_pretrained(vlm_dir)
    vlm_params = sum(p.numel() for p in vlm.parameters())
    del vlm
    gc.collect()
    qwen_style_tokenizer(preset.base_vocab).save_pretrained(vlm_dir)
    default_image_processor().save_pretrained(vlm_dir)
    sam = SamModel(sam_config(preset, args.sam_layers))
    sam.save_pretrained(sam_dir)
    sam_params = sum(p.numel() for p in sam.parameters())
    del sam
    gc.collect()
    return {
        "vlm": str(vlm_dir),
        "sam": str(sam_dir),
        "vlm_params": vlm_params,
        "sam_params": sam_params,
        "vlm_bytes": folder_bytes(vlm_dir),
        "sam_bytes": folder_bytes(sam_dir),
    }


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


# --------------------------------------------------------------------------- measuring
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def current_rss() -> int:
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    kib = _proc_status_kib("VmRSS")
    return (kib or 0) * 1024


def process_peak_rss() -> int:
    """``ru_maxrss``: the process-wide high-water mark (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 16 * 1024


@dataclass
class StepRecord:
    name: str
    seconds: float | None = None
    peak_bytes: int | None = None  # CPU: peak RSS in the step (or process-wide, see report)
    rss_after_bytes: int | None = None
    rss_delta_bytes: int | None = None
    cuda_peak_bytes: int | None = None
    cuda_after_bytes: int | None = None
    status: str = "ok"  # ok | skipped | failed
    note: str = ""


class StepFailed(RuntimeError):
    def __init__(self, step: str, cause: BaseException):
        why = str(cause) if isinstance(cause, CheckFailed) else f"{type(cause).__name__}: {cause}"
        super().__init__(why)
        self.step = step
        self.cause = cause


class CheckFailed(RuntimeError):
    """A step ran but its result is wrong (non-finite loss, reload mismatch, ...)."""


class Meter:
    """Times steps and measures their memory; prints progress."""

    def __init__(self, device: torch.device, total: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.total = total
        self.records: list[StepRecord] = []
        self.per_step_peak = reset_peak_rss()
        self.process_peak = process_peak_rss()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        record = StepRecord(name)
        self.records.append(record)
        print(f"[{len(self.records)}/{self.total}] {name} ...", flush=True)
        gc.collect()
        self._sync()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        rss_before = current_rss()
        if self.per_step_peak:
            reset_peak_rss()
        start = time.perf_counter()
        try:
            result = fn()
            self._sync()
        except Exception as error:
            record.status = "failed"
            record.note = f"{type(error).__name__}: {error}"
            raise StepFailed(name, error) from error
        finally:
            record.seconds = time.perf_counter() - start
            rss_after = current_rss()
            kib = _proc_status_kib("VmHWM") if self.per_step_peak else None
            peak = kib * 1024 if kib is not None else process_peak_rss()
            record.peak_bytes = max(peak, rss_after)
            record.rss_after_bytes = rss_after
            record.rss_delta_bytes = rss_after - rss_before
            self.process_peak = max(self.process_peak, record.peak_bytes)
            if self.cuda:
                record.cuda_peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
                record.cuda_after_bytes = int(torch.cuda.memory_allocated(self.device))
        memory = f"peak RSS {gib(record.peak_bytes)}"
        if self.cuda:
            memory = f"peak CUDA {gib(record.cuda_peak_bytes)}, {memory}"
        print(f"    done in {record.seconds:.2f} s ({memory})", flush=True)
        return result

    def fail(self, name: str, message: str) -> None:
        """Fail a step that ran, on a check of its result."""
        for record in reversed(self.records):
            if record.name == name:
                record.status, record.note = "failed", message
                break
        raise StepFailed(name, CheckFailed(message))

    def skip(self, name: str, why: str) -> None:
        self.records.append(StepRecord(name, status="skipped", note=why))
        print(f"[{len(self.records)}/{self.total}] {name}: skipped ({why})", flush=True)


def amount(n: int) -> str:
    """1234567 -> '1.23 M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"


def gib(value: int | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:+.2f} GiB" if signed else f"{value / GIB:.2f} GiB"


# --------------------------------------------------------------------------- the run
@dataclass
class CheckReport:
    preset: str
    device: str
    dtype: str
    workdir: str
    machine: str
    steps: list[StepRecord] = field(default_factory=list)
    peak_is_per_step: bool = False
    process_peak_bytes: int | None = None
    checkpoints: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    image_grid_thw: list[int] = field(default_factory=list)
    image_tokens: int | None = None
    sequence_length: int | None = None
    losses: dict[str, float] = field(default_factory=dict)
    grad_parameters: int | None = None
    segment: dict[str, Any] = field(default_factory=dict)
    saved_bytes: int | None = None
    reload_max_abs_diff: dict[str, float] = field(default_factory=dict)
    total_seconds: float | None = None
    error: str | None = None
    failed_step: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


STEP_NAMES = (
    "build checkpoints",
    "assemble (from_backbones)",
    "processor",
    "forward (labels + masks)",
    "backward",
    "optimizer step",
    "segment",
    "save_pretrained",
    "from_pretrained (reload)",
    "reload check (2 forwards)",
)


def synthetic_example() -> tuple[np.ndarray, np.ndarray]:
    """A 640x480 RGB picture (noise on a gradient, a bright bar) and the bar's mask."""
    height, width = IMAGE_SIZE
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, width, dtype=np.float32)[None, :, None]
    image = ramp + rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    mask = np.zeros((1, height, width), dtype=np.uint8)
    mask[0, 200:240, 120:460] = 1
    image[mask[0] == 1] = (230, 230, 235)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def forced_answer(tokenizer, response: str) -> tuple[Callable[[int, torch.Tensor], list[int]], int]:
    """A ``prefix_allowed_tokens_fn`` that makes generation write ``response`` then
    ``<|im_end|>`` (an untrained model's well-formed answer), and that answer's length in
    tokens. Stateless: it counts the tokens after the last ``<|im_start|>assistant\\n``."""
    answer = tokenizer(response, add_special_tokens=False)["input_ids"]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = len(tokenizer("assistant\n", add_special_tokens=False)["input_ids"])
    forced = [*answer, im_end]

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        ids = input_ids.tolist()
        written = ids[::-1].index(im_start) - header  # tokens after "<|im_start|>assistant\n"
        return [forced[written]] if 0 <= written < len(forced) else [im_end]

    return allowed, len(forced)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        part = name.split(".", 1)[0]
        if part == "vlm":
            part = "vlm.vision" if ".visual." in f".{name}" else "vlm.language"
        counts[part] = counts.get(part, 0) + param.numel()
    counts["total"] = sum(counts.values())
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_check(args: argparse.Namespace) -> CheckReport:
    """Build, assemble and run every step; the report holds whatever finished."""
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    d_sae = args.d_sae if args.d_sae is not None else preset.d_sae
    temporary = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="segcompass-check-")) if temporary else Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    report = CheckReport(
        preset=args.preset,
        device=str(device),
        dtype=args.dtype,
        workdir=str(root),
        machine=describe_machine(device),
    )
    meter = Meter(device, total=len(STEP_NAMES))
    report.steps = meter.records
    report.peak_is_per_step = meter.per_step_peak
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    try:
        _run_steps(args, preset, device, dtype, d_sae, root, meter, report)
    except StepFailed as failure:
        report.failed_step = failure.step
        report.error = str(failure)
        if args.traceback:
            traceback.print_exception(failure.cause, file=sys.stderr)
    finally:
        report.total_seconds = time.perf_counter() - start
        report.process_peak_bytes = max(meter.process_peak, process_peak_rss())
        if temporary and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return report


def _run_steps(
    args: argparse.Namespace,
    preset: Preset,
    device: torch.device,
    dtype: torch.dtype,
    d_sae: int,
    root: Path,
    meter: Meter,
    report: CheckReport,
) -> None:
    ckpt = meter.run(STEP_NAMES[0], lambda: build_checkpoints(args, preset, root / "backbones"))
    report.checkpoints = ckpt
    print(
        f"    VLM {amount(ckpt['vlm_params'])} parameters ({size(ckpt['vlm_bytes'])} on disk), "
        f"SAM {amount(ckpt['sam_params'])} ({size(ckpt['sam_bytes'])})"
    )

    def assemble():
        model, processor = SegCompassForReasoningSegmentation.from_backbones(
            vlm=ckpt["vlm"],
            sam=ckpt["sam"],
            num_slots=NUM_SLOTS,
            dtype=args.dtype,
            d_sae=d_sae,
            **preset.head_overrides,
        )
        return model.to(device), processor

    model, processor = meter.run(STEP_NAMES[1], assemble)
    report.parameters = count_parameters(model)
    cfg = model.config
    report.config = {
        "d_sae": cfg.d_sae,
        "sae_k": cfg.sae_k,
        "sae_layer": cfg.sae_layer,
        "num_slots": cfg.num_slots,
        "ref_token_id": cfg.ref_token_id,
        "think_start_token_id": cfg.think_start_token_id,
        "think_end_token_id": cfg.think_end_token_id,
        "vocab_rows": model.get_input_embeddings().weight.shape[0],
        "tokenizer_size": len(processor.tokenizer),
    }
    parts = ", ".join(f"{k} {amount(v)}" for k, v in report.parameters.items() if k != "total")
    print(f"    parameters: {amount(report.parameters['total'])} ({parts})")
    print(f"    config: {report.config}")

    image, mask = synthetic_example()

    def prepare():
        batch = processor(image, INSTRUCTION, responses=RESPONSE, masks=[mask])
        for key in ("original_sizes", "reshaped_input_sizes"):
            batch.pop(key, None)
        return dict(batch)

    batch = meter.run(STEP_NAMES[2], prepare)
    image_token_id = cfg.vlm_config.image_token_id
    if processor.image_token_id != image_token_id:
        meter.fail(
            STEP_NAMES[2],
            f"the processor's image token id {processor.image_token_id} differs from the VLM "
            f"config's image_token_id {image_token_id}",
        )
    grid = [int(v) for v in batch["image_grid_thw"][0]]
    merge = processor.merge_size
    report.image_grid_thw = grid
    report.image_tokens = int((batch["input_ids"] == image_token_id).sum())
    report.sequence_length = int(batch["input_ids"].shape[1])
    expected = math.prod(grid) // (merge * merge)
    refs = int((batch["input_ids"] == cfg.ref_token_id).sum())
    print(
        f"    {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} image: grid (t, h, w) = {tuple(grid)}, "
        f"{report.image_tokens} image tokens; sequence of {report.sequence_length} tokens, "
        f"{refs} <REF_POS>"
    )
    if report.image_tokens != expected or refs != NUM_SLOTS:
        meter.fail(
            STEP_NAMES[2],
            f"expected {expected} image tokens and {NUM_SLOTS} <REF_POS>, got "
            f"{report.image_tokens} and {refs}",
        )
    batch = _to_device(batch, device)

    def forward():
        model.train()
        out = model(**batch)
        losses = {
            name: float(getattr(out, name).detach())
            for name in ("loss", "lm_loss", "seg_loss", "conf_loss")
            if getattr(out, name, None) is not None
        }
        if "loss" not in losses or not all(math.isfinite(v) for v in losses.values()):
            raise CheckFailed(f"the losses are not all finite: {losses}")
        return out.loss, losses

    loss, report.losses = meter.run(STEP_NAMES[3], forward)
    print("    " + ", ".join(f"{k} {v:.4f}" for k, v in report.losses.items()))

    meter.run(STEP_NAMES[4], loss.backward)
    del loss
    with_grad = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    bad = [n for n, p in with_grad if not torch.isfinite(p.grad).all()]
    report.grad_parameters = sum(p.numel() for _, p in with_grad)
    print(f"    gradients on {len(with_grad)} tensors, {amount(report.grad_parameters)} values")
    if not with_grad or bad:
        meter.fail(STEP_NAMES[4], f"no gradient, or non-finite gradients in {bad[:5]}")

    if args.optimizer == "none":
        meter.skip(STEP_NAMES[5], "--optimizer none")
    else:

        def step():
            params = [p for _, p in with_grad]
            kind = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD
            optimizer = kind(params, lr=args.lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        name = f"{STEP_NAMES[5]} ({args.optimizer})"
        meter.run(name, step)
        broken = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            meter.fail(
                name,
                f"the step left non-finite weights in {len(broken)} tensors ({broken[:3]}); "
                "AdamW on float16 weights does that (its second moment and eps underflow to 0): train float16 with "
                "float32 master weights (mixed precision), or use bfloat16",
            )
    with_grad = None
    model.zero_grad(set_to_none=True)
    model.eval()

    def segment():
        kwargs: dict[str, Any] = {}
        if not args.free_generation:
            force, length = forced_answer(processor.tokenizer, RESPONSE)
            if length > args.max_new_tokens:
                raise CheckFailed(
                    f"--max-new-tokens {args.max_new_tokens} is shorter than the forced answer "
                    f"({length} tokens)"
                )
            # random weights: keep every slot, so that the mask post-processing runs
            kwargs = {"generation_kwargs": {"prefix_allowed_tokens_fn": force}}
            kwargs["confidence_threshold"] = float("-inf")
        with torch.no_grad():
            [result] = model.segment(
                image, INSTRUCTION, processor, max_new_tokens=args.max_new_tokens, **kwargs
            )
        return result

    result = meter.run(STEP_NAMES[6], segment)
    report.segment = {
        "text": result.text,
        "masks": list(result.masks.shape),
        "reason": result.reason,
    }
    print(f"    text: {result.text!r}; masks {tuple(result.masks.shape)}; reason: {result.reason}")
    if not args.free_generation and (
        result.reason is not None or tuple(result.masks.shape) != (NUM_SLOTS, *IMAGE_SIZE)
    ):
        meter.fail(
            STEP_NAMES[6],
            f"the forced answer should give {NUM_SLOTS} masks of {IMAGE_SIZE}, got "
            f"{tuple(result.masks.shape)} (reason: {result.reason})",
        )

    saved = root / "segcompass"

    def save():
        model.save_pretrained(saved)
        processor.save_pretrained(saved)
        return folder_bytes(saved)

    report.saved_bytes = meter.run(STEP_NAMES[7], save)
    print(f"    {size(report.saved_bytes)} in {saved}")

    def reload():
        loaded = SegCompassForReasoningSegmentation.from_pretrained(saved, dtype=dtype)
        return loaded.to(device).eval(), SegCompassProcessor.from_pretrained(saved)

    reloaded, reloaded_processor = meter.run(STEP_NAMES[8], reload)

    def compare():
        again = reloaded_processor(image, INSTRUCTION, responses=RESPONSE, masks=[mask])
        for key in ("input_ids", "labels", "pixel_values", "sam_pixel_values", "gt_masks"):
            if not torch.equal(again[key].to(device), batch[key]):
                raise CheckFailed(f"the reloaded processor gives another {key}")
        diffs: dict[str, float] = {}
        with torch.no_grad():
            ours = model(**batch, compute_logits=True)
            theirs = reloaded(**batch, compute_logits=True)
        for name in ("logits", "heatmap_logits", "conf_logits", "mask_logits", "iou_scores"):
            a, b = getattr(ours, name, None), getattr(theirs, name, None)
            if a is not None and b is not None:
                diffs[name] = float((a.float() - b.float()).abs().max())
        for name in ("loss", "lm_loss", "seg_loss", "conf_loss"):
            a, b = getattr(ours, name, None), getattr(theirs, name, None)
            if a is not None and b is not None:
                diffs[name] = abs(float(a) - float(b))
        return diffs

    report.reload_max_abs_diff = meter.run(STEP_NAMES[9], compare)
    worst = max(report.reload_max_abs_diff.values(), default=float("nan"))
    print(f"    max |in-process - reloaded| = {worst:g} ({report.reload_max_abs_diff})")
    if not worst <= args.reload_tolerance:
        meter.fail(
            STEP_NAMES[9],
            f"the reloaded model's outputs differ from the in-process ones by {worst:g} "
            f"(> --reload-tolerance {args.reload_tolerance:g}): {report.reload_max_abs_diff}",
        )


def describe_machine(device: torch.device) -> str:
    cpus = os.cpu_count() or 0
    try:
        with open("/proc/meminfo") as info:
            total_kib = int(re.search(r"MemTotal:\s+(\d+) kB", info.read()).group(1))
        memory = f", {total_kib / 1024**2:.0f} GiB RAM"
    except (OSError, AttributeError):
        memory = ""
    text = f"{platform.machine()} {cpus}-core CPU{memory}, torch {torch.__version__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += f", {props.name} ({props.total_memory / GIB:.0f} GiB)"
    return text


# --------------------------------------------------------------------------- output
def format_table(report: CheckReport) -> str:
    cuda = report.device.startswith("cuda")
    head = ["step", "seconds"]
    if cuda:
        head += ["peak CUDA alloc", "CUDA alloc after"]
    head += ["peak RSS", "RSS after", "RSS change"]
    rows = []
    for record in report.steps:
        seconds = "-" if record.seconds is None else f"{record.seconds:.2f}"
        if record.status == "skipped":
            seconds = "skipped"
        elif record.status == "failed":
            seconds = f"{seconds} FAILED"
        row = [record.name, seconds]
        if cuda:
            row += [gib(record.cuda_peak_bytes), gib(record.cuda_after_bytes)]
        row += [
            gib(record.peak_bytes),
            gib(record.rss_after_bytes),
            gib(record.rss_delta_bytes, signed=True),
        ]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_summary(report: CheckReport) -> str:
    peak_kind = (
        "peak RSS: high-water mark during the step (VmHWM, reset before each step)"
        if report.peak_is_per_step
        else "peak RSS: process-wide high-water mark so far (ru_maxrss; no per-step reset here)"
    )
    lines = [
        f"preset {report.preset}, device {report.device}, dtype {report.dtype}; {report.machine}",
        peak_kind + f"; process peak {gib(report.process_peak_bytes)}",
        f"total {report.total_seconds:.1f} s",
    ]
    if report.parameters:
        lines.append(
            f"parameters: {report.parameters['total']:,} "
            f"(trainable {report.parameters['trainable']:,})"
        )
    if report.image_tokens is not None:
        lines.append(
            f"image tokens: {report.image_tokens} for a {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} image "
            f"(grid {tuple(report.image_grid_thw)}); sequence {report.sequence_length} tokens"
        )
    if report.losses:
        lines.append("loss: " + ", ".join(f"{k} {v:.4f}" for k, v in report.losses.items()))
    if report.reload_max_abs_diff:
        worst = max(report.reload_max_abs_diff.values())
        lines.append(f"reload: max |in-process - reloaded| = {worst:g}")
    failed = f"result: FAILED in step '{report.failed_step}': {report.error}"
    lines.append("result: OK" if report.ok else failed)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Check that SegCompass assembles, trains one step, segments, saves and reloads at "
            "Qwen2.5-VL-7B / SAM ViT-H widths (random weights, few layers, nothing downloaded)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="real",
        help="'real': the published widths; 'tiny': toy widths, same formats and steps (tests)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to run on (cuda if available, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="dtype of the assembled model (from_backbones(dtype=...))",
    )
    parser.add_argument("--text-layers", type=int, default=3, help="VLM decoder layers (28 real)")
    parser.add_argument("--vision-blocks", type=int, default=2, help="VLM vision blocks (32 real)")
    parser.add_argument("--sam-layers", type=int, default=2, help="SAM ViT blocks (32 for ViT-H)")
    parser.add_argument(
        "--d-sae",
        type=int,
        default=None,
        help="latents of the fresh SAE (default: 65536 for 'real', 256 for 'tiny')",
    )
    parser.add_argument(
        "--optimizer",
        choices=("sgd", "adamw", "none"),
        default="sgd",
        help="optimizer of the one training step over every parameter with a gradient "
        "(adamw adds two states per parameter: about 12 GB more at the real widths in bf16)",
    )
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate of that step")
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="generation budget of model.segment"
    )
    parser.add_argument(
        "--free-generation",
        action="store_true",
        help="let segment generate freely (random weights then write no <REF_POS>: no mask) "
        "instead of forcing a well-formed answer",
    )
    parser.add_argument(
        "--reload-tolerance",
        type=float,
        default=0.0,
        help="largest accepted |in-process - reloaded| output difference",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder for the checkpoints (about 8.5 GB at the default real widths; kept); default: a "
        "temporary folder, removed at the end",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    parser.add_argument(
        "--traceback", action="store_true", help="print the traceback of a failed step"
    )
    args = parser.parse_args(argv)
    for name in ("text_layers", "vision_blocks", "sam_layers", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.d_sae is not None and args.d_sae < 1:
        parser.error("--d-sae must be >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"SegCompass setup check: preset {args.preset}, device {args.device}, dtype {args.dtype}, "
        f"{args.text_layers} text layers, {args.vision_blocks} vision blocks, "
        f"{args.sam_layers} SAM blocks",
        flush=True,
    )
    with quiet_transformers():
        report = run_check(args)
    print()
    print(format_table(report))
    print()
    print(format_summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str))
    if not report.ok:
        print(
            f"\nSetup check FAILED in step '{report.failed_step}': {report.error}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
