"""SegCompassProcessor: chat prompt, image for the VLM and for SAM, masks in and out.

Remote-code file: it is copied next to a saved model and imported by users who do not have
this package, so it imports only the standard library, numpy, torch and transformers (PIL
only inside ``try``).

What one call does (arXiv 2605.22658, the model's data flow):

1. The instruction becomes the SegCompass prompt (`build_prompt`), rendered with the
   tokenizer's chat template around one image placeholder; the placeholder is expanded to
   the image's token count ``grid_t * grid_h * grid_w // merge_size**2`` exactly as
   Qwen2.5-VL's own processor does.
2. The image becomes (H, W, 3) uint8 RGB (`sam_frame.to_rgb_uint8`; a PIL image is turned
   upright by its EXIF orientation, so masks line up with the image as a viewer shows it),
   then goes twice through preprocessing: the Qwen2-VL image processor (patches for
   the VLM) and SAM's "resize longest side, normalise, pad bottom/right" recipe
   (`sam_pixel_values`, `sam_frame.py`), done in torch so that torchvision is not needed.
3. Optional responses are appended for training (labels = -100 on the prompt and padding);
   optional ground-truth masks go through the same resize/pad as the SAM image and then to
   the mask grid M = 4E (256 for real SAM) like the reference's ``mask_float_256``.

`post_process_masks` inverts the SAM geometry for predicted mask logits.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .answer_format import (
    ANSWER_TOKENS,
    REF_TOKEN,
    THINK_END,
    THINK_START,
    ParsedAnswer,
    parse_answer,
)
from .loading import load_processor_safely
from .sam_frame import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    SamImage,
    post_process_masks,
    prepare_masks,
    prepare_sam_image,
    to_rgb_uint8,
    valid_mask,
)

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<|image_pad|>"
IM_END_TOKEN = "<|im_end|>"
THINK_START_TOKEN = THINK_START
THINK_END_TOKEN = THINK_END
DEFAULT_REF_TOKEN = REF_TOKEN
#: Control tokens of the Qwen2.5-VL chat format.
QWEN_CONTROL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Control and answer tokens that an instruction may never contain (prompt injection guard);
#: `SegCompassProcessor.control_tokens` adds every special and added token of the tokenizer.
RESERVED_TOKENS: tuple[str, ...] = QWEN_CONTROL_TOKENS + ANSWER_TOKENS
IGNORE_INDEX = -100
_DEFAULT = object()  # marks "return_tensors not given"


# --------------------------------------------------------------------------- prompt
def build_prompt(instruction: str, num_slots: int) -> str:
    """The user-turn text of SegCompass: the task, then the answer format.

    This is the one place the prompt wording lives. It asks for a chain of thought inside
    think tags followed by ``num_slots`` reference-position tokens (the paper's data flow, step 1).
    The tags and the reference token are named in words, not written as tokens, so that
    every `<think>`, `</think>` and `<REF_POS>` id of a sequence comes from the response: the
    model takes the *last* K `<REF_POS>` states, and a completion without them must get no
    mask instead of silently reading one from the prompt.

    >>> build_prompt("the red circle", 1)
    'Please find: the red circle. First think step by step inside think tags, then give 1 reference position token.'
    """
    if not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"Expected num_slots to be an int >= 1, got {num_slots!r}.")
    text = instruction.strip()
    if not text.endswith((".", "?", "!")):
        text += "."
    plural = "token" if num_slots == 1 else "tokens, one per object"
    return (
        f"Please find: {text} First think step by step inside think tags, "
        f"then give {num_slots} reference position {plural}."
    )


#: `answer_format.parse_answer` / `ParsedAnswer` under the names this module has exported.
parse_response = parse_answer
ParsedResponse = ParsedAnswer


# --------------------------------------------------------------------------- processor
class SegCompassProcessor(ProcessorMixin):
    """Turns (image, instruction[, response, masks]) into SegCompass model inputs.

    Args:
        image_processor: a Qwen2-VL image processor (`Qwen2VLImageProcessorPil` without
            torchvision); its ``merge_size`` sets the number of image tokens.
        tokenizer: a Qwen2-style tokenizer that knows `<|image_pad|>`, `<think>`, `</think>`
            and the reference token.
        chat_template: defaults to the tokenizer's chat template.
        num_slots: K, the number of reference tokens the prompt asks for.
        sam_image_size: S, the side of SAM's square input (1024 real, 64 tiny).
        mask_size: M = 4E, the side of the mask grid (256 real, 64 tiny).
        sam_pixel_mean, sam_pixel_std: SAM normalisation on the 0-255 scale.
        ref_token: the reference-position token.
        max_instruction_chars: longer instructions are refused (raise it here if needed).

    Padding: prompts alone (generation) are LEFT padded, so every prompt ends where the
    generated text starts; prompt + response sequences (training) are RIGHT padded, so that
    positions and labels line up with the unpadded text. Pass ``padding_side`` to override.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_slots: int = 1,
        sam_image_size: int = 1024,
        mask_size: int = 256,
        sam_pixel_mean: list[float] | None = None,
        sam_pixel_std: list[float] | None = None,
        ref_token: str = DEFAULT_REF_TOKEN,
        max_instruction_chars: int = 2000,
    ):
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        for field, value in (
            ("num_slots", num_slots),
            ("sam_image_size", sam_image_size),
            ("mask_size", mask_size),
            ("max_instruction_chars", max_instruction_chars),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {field} to be an int >= 1, got {value!r}.")
        self.num_slots = num_slots
        self.sam_image_size = sam_image_size
        self.mask_size = mask_size
        self.sam_pixel_mean = [float(v) for v in (sam_pixel_mean or SAM_PIXEL_MEAN)]
        self.sam_pixel_std = [float(v) for v in (sam_pixel_std or SAM_PIXEL_STD)]
        if len(self.sam_pixel_mean) != 3 or len(self.sam_pixel_std) != 3:
            raise ValueError(
                "Expected sam_pixel_mean and sam_pixel_std to have 3 values (R, G, B), got "
                f"{self.sam_pixel_mean} and {self.sam_pixel_std}."
            )
        if min(self.sam_pixel_std) <= 0:
            raise ValueError(f"Expected positive sam_pixel_std, got {self.sam_pixel_std}.")
        self.ref_token = ref_token
        self.max_instruction_chars = max_instruction_chars
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        self.ref_token_id = self._token_id(ref_token)
        self.im_end_token_id = self._token_id(IM_END_TOKEN)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """`ProcessorMixin.from_pretrained`, naming a missing or damaged file of a local folder
        (a cut ``tokenizer.json``, a deleted one) and the fix (`loading.load_processor_safely`)."""
        return load_processor_safely(
            super().from_pretrained, pretrained_model_name_or_path, *args, **kwargs
        )

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        unk = self.tokenizer.unk_token_id
        if token_id is None or (token_id == unk and token != self.tokenizer.unk_token):
            raise ValueError(
                f"Expected the tokenizer to know {token!r} as one token, but it does not. Add it "
                f"with `tokenizer.add_tokens([{token!r}])` (and resize the model's embeddings)."
            )
        return int(token_id)

    # ------------------------------------------------------------- constructors
    @classmethod
    def tiny(
        cls,
        tokenizer,
        *,
        num_slots: int = 3,
        image_size: int = 64,
        mask_size: int = 64,
        patch_size: int = 8,
        merge_size: int = 2,
    ) -> SegCompassProcessor:
        """The processor of the embedded default (`SegCompassConfig.tiny()`).

        The image processor works at patch 8 and merge 2 and keeps images between
        ``(patch * merge)**2`` pixels (one image token) and ``image_size**2`` pixels (16
        tokens), so a 64x64 image stays 64x64: grid (1, 8, 8), 16 image tokens; larger
        images are scaled down. SAM input and mask grid are 64 px.
        """
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        factor = patch_size * merge_size
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=patch_size,
            merge_size=merge_size,
            temporal_patch_size=2,
            min_pixels=factor * factor,
            max_pixels=max(image_size * image_size, factor * factor),
        )
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_slots=num_slots,
            sam_image_size=image_size,
            mask_size=mask_size,
        )

    @classmethod
    def from_vlm_processor(
        cls,
        vlm_processor: Any,
        *,
        num_slots: int = 1,
        sam_image_size: int = 1024,
        mask_size: int = 256,
        **kwargs,
    ) -> SegCompassProcessor:
        """Build from a real VLM's processor (e.g. a local Qwen2.5-VL-7B folder).

        ``vlm_processor`` is a processor object with ``tokenizer`` and ``image_processor``,
        or a local path / repo id holding both. `<think>`, `</think>` and the reference token
        are added to the tokenizer as (non-special) tokens when missing; the model's token
        embeddings must then be resized to ``len(processor.tokenizer)``.
        """
        if isinstance(vlm_processor, ProcessorMixin):
            tokenizer = vlm_processor.tokenizer
            image_processor = vlm_processor.image_processor
        else:
            tokenizer = AutoTokenizer.from_pretrained(vlm_processor)
            image_processor = AutoImageProcessor.from_pretrained(vlm_processor)
        ref_token = kwargs.get("ref_token", DEFAULT_REF_TOKEN)
        vocab = tokenizer.get_vocab()
        missing = [t for t in (THINK_START_TOKEN, THINK_END_TOKEN, ref_token) if t not in vocab]
        if missing:
            tokenizer.add_tokens(missing)
            logger.warning(
                "Added %s to the tokenizer (now %d tokens); resize the model's token embeddings.",
                missing,
                len(tokenizer),
            )
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_slots=num_slots,
            sam_image_size=sam_image_size,
            mask_size=mask_size,
            **kwargs,
        )

    # ------------------------------------------------------------- pieces
    @property
    def merge_size(self) -> int:
        return int(getattr(self.image_processor, "merge_size", 2))

    def build_prompt(self, instruction: str, num_slots: int | None = None) -> str:
        """The full chat-formatted prompt (one image placeholder, generation prompt added)."""
        k = self.num_slots if num_slots is None else num_slots
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": build_prompt(instruction, k)},
                ],
            }
        ]
        template = self.chat_template or self.tokenizer.chat_template
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )

    @property
    def control_tokens(self) -> tuple[str, ...]:
        """Tokens an instruction may not contain: `RESERVED_TOKENS`, the answer tokens and
        every special or added token of the tokenizer (a real Qwen tokenizer's
        `<|box_start|>`, `<tool_call>`, ...), longest first. The tokenizer matches these in
        raw text, so each would put a control id into the prompt. Added tokens that are plain
        words (letters and digits only) are vocabulary and stay allowed."""
        tokenizer = self.tokenizer
        found = {*RESERVED_TOKENS, THINK_START_TOKEN, THINK_END_TOKEN, self.ref_token}
        found.update(getattr(tokenizer, "all_special_tokens", None) or ())
        get_added_vocab = getattr(tokenizer, "get_added_vocab", None)
        if get_added_vocab is not None:
            found.update(get_added_vocab())
        markup = (t for t in found if isinstance(t, str) and t.strip() and not t.isalnum())
        return tuple(sorted(markup, key=lambda t: (-len(t), t)))

    @staticmethod
    def _check_unicode(text: str, name: str) -> None:
        """Refuse a lone surrogate (half of a UTF-16 pair, e.g. the JSON escape ``\\ud83d``
        alone): it is not text the tokenizer can encode."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            char = text[error.start]
            raise ValueError(
                f"{name} contains a lone surrogate U+{ord(char):04X} at character {error.start}, "
                "which is not valid Unicode text and cannot be tokenized (often half of an "
                "emoji escaped as two \\u codes). Send both halves of the pair, or remove it."
            ) from None

    def _check_instruction(
        self, instruction: Any, index: int, control_tokens: tuple[str, ...] = RESERVED_TOKENS
    ) -> str:
        name = f"instructions[{index}]"
        if not isinstance(instruction, str):
            raise TypeError(f"Expected {name} to be a str, got {type(instruction).__name__}.")
        if not instruction.strip():
            raise ValueError(f"{name} is empty or whitespace only; give a non-empty instruction.")
        if len(instruction) > self.max_instruction_chars:
            raise ValueError(
                f"{name} has {len(instruction)} characters, more than max_instruction_chars="
                f"{self.max_instruction_chars}. Shorten it, or raise the limit with "
                "`processor.max_instruction_chars = N` (saved with the processor)."
            )
        self._check_unicode(instruction, name)
        for token in (*control_tokens, self.ref_token):
            if token in instruction:
                raise ValueError(
                    f"{name} contains the control token {token!r}, which would change the "
                    "prompt's structure; remove it from the instruction."
                )
        return instruction

    def prepare_sam_image(self, rgb: np.ndarray) -> SamImage:
        """SAM preprocessing of one (H, W, 3) uint8 image (`sam_frame.prepare_sam_image`)."""
        return prepare_sam_image(rgb, self.sam_image_size, self.sam_pixel_mean, self.sam_pixel_std)

    def valid_mask(self, reshaped_size: tuple[int, int]) -> torch.Tensor:
        """(M, M) bool: True on mask-grid cells that overlap the unpadded (resized) image."""
        return valid_mask(reshaped_size, self.mask_size, self.sam_image_size)

    def prepare_masks(
        self, masks: Any, image_size: tuple[int, int], name: str = "masks"
    ) -> torch.Tensor:
        """Ground-truth masks (N, H, W) at the image size -> (N, M, M) float in {0, 1}
        (`sam_frame.prepare_masks`)."""
        return prepare_masks(masks, image_size, self.mask_size, self.sam_image_size, name)

    # ------------------------------------------------------------- main call
    def __call__(
        self,
        images: Any = None,
        instructions: str | list[str] | None = None,
        responses: str | list[str] | None = None,
        masks: Any = None,
        *,
        text: str | list[str] | None = None,
        return_tensors: str | None | object = _DEFAULT,
        padding_side: str | None = None,
        num_slots: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Prepare a batch.

        Args:
            images: one image or a list (PIL of any mode, its EXIF orientation applied;
                numpy HW/HWC, torch CHW/HWC, taken as upright).
            instructions: one instruction per image; the prompt is built with `build_prompt`.
            responses: optional target completions (``<think> ... </think> <REF_POS>``);
                the sequence becomes prompt + response + `<|im_end|>`.
            masks: optional ground-truth masks, one (N, H, W) bool/uint8 array per image at
                the image's size (N may be 0 for no-target).
            text: alternative to ``instructions`` (what TRL and `apply_chat_template` pass):
                already formatted prompts with one image placeholder per image.
            return_tensors: "pt" for padded tensors; None leaves token ids as unpadded lists.
                Default: "pt" with ``instructions``; None with ``text`` (as transformers'
                processors, which TRL relies on to read unpadded prompt ids).
            padding_side: "left" or "right"; defaults to left for prompts and right for
                prompt + response.
            num_slots: K for this call (default ``self.num_slots``).

        Returns:
            `BatchFeature` with ``input_ids`` (B, L), ``attention_mask`` (B, L),
            ``pixel_values`` (total patches, C*T*P*P), ``image_grid_thw`` (B, 3),
            ``sam_pixel_values`` (B, 3, S, S), ``original_sizes`` (B, 2),
            ``reshaped_input_sizes`` (B, 2), ``valid_mask`` (B, M, M) bool; with responses
            also ``labels`` (B, L) (-100 on prompt and padding); with masks also
            ``gt_masks`` (B, G, M, M) float in {0, 1} (G = max(K, max N), zero padded) and
            ``num_objects`` (B,) long.
        """
        if kwargs.get("videos") is not None or kwargs.get("audio") is not None:
            raise ValueError("SegCompassProcessor handles images only; got videos or audio.")
        if return_tensors is _DEFAULT:
            return_tensors = None if text is not None else "pt"
        if return_tensors not in ("pt", None):
            raise ValueError(f"Expected return_tensors='pt' or None, got {return_tensors!r}.")
        if padding_side not in (None, "left", "right"):
            raise ValueError(
                f"Expected padding_side 'left', 'right' or None, got {padding_side!r}."
            )
        if text is not None:
            if instructions is not None:
                raise ValueError("Pass either instructions or text (formatted prompts), not both.")
            return self._call_with_text(images, text, return_tensors, padding_side)
        if instructions is None:
            raise ValueError("Expected instructions (one per image), got None.")

        image_list = self._as_image_list(images)
        instruction_list = [instructions] if isinstance(instructions, str) else list(instructions)
        if len(image_list) != len(instruction_list):
            raise ValueError(
                f"Expected one instruction per image, got {len(image_list)} images and "
                f"{len(instruction_list)} instructions."
            )
        if not image_list:
            raise ValueError("Expected at least one image and instruction, got an empty batch.")
        control = self.control_tokens
        instruction_list = [
            self._check_instruction(t, i, control) for i, t in enumerate(instruction_list)
        ]
        response_list = None
        if responses is not None:
            response_list = [responses] if isinstance(responses, str) else list(responses)
            if len(response_list) != len(image_list):
                raise ValueError(
                    f"Expected one response per image, got {len(response_list)} responses for "
                    f"{len(image_list)} images."
                )
            for i, response in enumerate(response_list):
                if not isinstance(response, str):
                    raise TypeError(
                        f"Expected responses[{i}] to be a str, got {type(response).__name__}."
                    )
                self._check_unicode(response, f"responses[{i}]")

        rgb_images = [to_rgb_uint8(img, f"images[{i}]") for i, img in enumerate(image_list)]
        vision = self._vision_inputs(rgb_images)
        k = self.num_slots if num_slots is None else num_slots
        prompts = [self.build_prompt(t, k) for t in instruction_list]
        prompt_ids = self._expand_and_tokenize(
            prompts, vision["image_grid_thw"], [1] * len(prompts)
        )

        data: dict[str, Any] = {}
        if response_list is None:
            sequences = prompt_ids
            side = padding_side or "left"
        else:
            sequences, label_rows = [], []
            for ids, response in zip(prompt_ids, response_list):
                answer = self.tokenizer(response + IM_END_TOKEN, add_special_tokens=False)
                answer_ids = list(answer["input_ids"])
                sequences.append(ids + answer_ids)
                label_rows.append([IGNORE_INDEX] * len(ids) + answer_ids)
            side = padding_side or "right"
        data.update(self._pad(sequences, side, return_tensors))
        if response_list is not None:
            if return_tensors == "pt":
                data["labels"] = self._pad_rows(label_rows, IGNORE_INDEX, side)
            else:
                data["labels"] = label_rows
        data.update(vision)
        data.update(self._sam_inputs(rgb_images))
        if masks is not None:
            data.update(self._mask_inputs(masks, rgb_images, k))
        return BatchFeature(data=data)

    # ------------------------------------------------------------- helpers of __call__
    @staticmethod
    def _as_image_list(images: Any) -> list:
        if images is None:
            raise ValueError("Expected images (one per instruction), got None.")
        if isinstance(images, (list, tuple)):
            return list(images)
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return list(images)  # a (B, C, H, W) batch
        return [images]

    def _vision_inputs(self, rgb_images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        for i, rgb in enumerate(rgb_images):
            h, w = rgb.shape[:2]
            if max(h, w) / min(h, w) > 200:
                raise ValueError(
                    f"images[{i}] has an aspect ratio of {max(h, w) / min(h, w):.0f} ({h}x{w}); "
                    "the Qwen2-VL image processor accepts at most 200. Crop or pad the image."
                )
        out = self.image_processor(
            images=rgb_images, return_tensors="pt", input_data_format="channels_last"
        )
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def _sam_inputs(self, rgb_images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        prepared = [self.prepare_sam_image(rgb) for rgb in rgb_images]
        return {
            "sam_pixel_values": torch.stack([p.pixel_values for p in prepared]),  # (B, 3, S, S)
            "original_sizes": torch.tensor([rgb.shape[:2] for rgb in rgb_images], dtype=torch.long),
            "reshaped_input_sizes": torch.tensor(
                [p.reshaped_size for p in prepared], dtype=torch.long
            ),
            "valid_mask": torch.stack([self.valid_mask(p.reshaped_size) for p in prepared]),
        }

    def _mask_inputs(
        self, masks: Any, rgb_images: list[np.ndarray], num_slots: int
    ) -> dict[str, torch.Tensor]:
        if isinstance(masks, (np.ndarray, torch.Tensor)) and len(rgb_images) == 1:
            masks = [masks]
        if not isinstance(masks, (list, tuple)) or len(masks) != len(rgb_images):
            given = len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__
            raise ValueError(
                f"Expected masks as a list with one (N, H, W) array per image ({len(rgb_images)}), "
                f"got {given}."
            )
        grids = [
            self.prepare_masks(m, rgb.shape[:2], name=f"masks[{i}]")
            for i, (m, rgb) in enumerate(zip(masks, rgb_images))
        ]
        num_objects = [g.shape[0] for g in grids]
        # G = max(K, max N): a shape that stays the same across batches (as the reference
        # pads to K) unless a sample has more objects than slots.
        num_gt = max(num_slots, max(num_objects))
        if max(num_objects) > num_slots:
            logger.warning(
                "A sample has %d ground-truth masks but the prompt asks for %d slots; "
                "the unmatched masks count as misses.",
                max(num_objects),
                num_slots,
            )
        m = self.mask_size
        gt = torch.zeros(len(grids), num_gt, m, m)  # (B, G, M, M)
        for i, g in enumerate(grids):
            gt[i, : g.shape[0]] = g
        return {"gt_masks": gt, "num_objects": torch.tensor(num_objects, dtype=torch.long)}

    def _expand_and_tokenize(
        self, prompts: list[str], image_grid_thw: torch.Tensor, images_per_prompt: list[int]
    ) -> list[list[int]]:
        """Replace each image placeholder by the image's token count, then tokenize.

        Qwen2.5-VL's processor does the same: one `<|image_pad|>` per merged patch,
        ``grid_t * grid_h * grid_w // merge_size**2``.
        """
        merge_length = self.merge_size**2
        counts = [int(thw.prod().item()) // merge_length for thw in image_grid_thw]
        expanded, cursor = [], 0
        for i, (prompt, n_images) in enumerate(zip(prompts, images_per_prompt)):
            found = prompt.count(self.image_token)
            if found != n_images:
                raise ValueError(
                    f"Expected text[{i}] to hold {n_images} image placeholder(s) "
                    f"{self.image_token!r}, found {found}."
                )
            pieces = prompt.split(self.image_token)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self.image_token * counts[cursor] + piece
                cursor += 1
            expanded.append(out)
        encoded = self.tokenizer(expanded, add_special_tokens=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def _pad_rows(self, rows: list[list[int]], value: int, side: str) -> torch.Tensor:
        length = max(len(r) for r in rows)
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if not row:
                continue
            if side == "right":
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        return out

    def _pad(self, sequences: list[list[int]], side: str, return_tensors: str | None) -> dict:
        if return_tensors is None:
            return {"input_ids": sequences, "attention_mask": [[1] * len(s) for s in sequences]}
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        return {
            "input_ids": self._pad_rows(sequences, pad_id, side),
            "attention_mask": self._pad_rows([[1] * len(s) for s in sequences], 0, side),
        }

    def _call_with_text(
        self, images: Any, text: str | list[str], return_tensors: str | None, padding_side
    ) -> BatchFeature:
        """The generic path used by TRL / `apply_chat_template`: formatted prompts + images.

        ``images`` is None, a flat list (one image per placeholder, in order) or a list of
        per-prompt lists. SAM inputs are added when every prompt has exactly one image.
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("Expected text to be a str or a list of str.")
        for i, t in enumerate(texts):
            self._check_unicode(t, f"text[{i}]")
        if images is None:
            per_prompt = [[] for _ in texts]
        elif (
            isinstance(images, (list, tuple))
            and images
            and all(isinstance(x, (list, tuple)) or x is None for x in images)
        ):
            per_prompt = [list(x) if x else [] for x in images]
        else:
            flat = self._as_image_list(images)
            counts = [t.count(self.image_token) for t in texts]
            if sum(counts) != len(flat):
                raise ValueError(
                    f"Expected {sum(counts)} images for the {self.image_token!r} placeholders in "
                    f"text, got {len(flat)}."
                )
            per_prompt, cursor = [], 0
            for c in counts:
                per_prompt.append(flat[cursor : cursor + c])
                cursor += c
        if len(per_prompt) != len(texts):
            raise ValueError(
                f"Expected one list of images per text, got {len(per_prompt)} lists for "
                f"{len(texts)} texts."
            )
        rgb_images = [
            to_rgb_uint8(img, f"images[{i}][{j}]")
            for i, imgs in enumerate(per_prompt)
            for j, img in enumerate(imgs)
        ]
        data: dict[str, Any] = {}
        if rgb_images:
            vision = self._vision_inputs(rgb_images)
            grid = vision["image_grid_thw"]
        else:
            vision, grid = {}, torch.zeros(0, 3, dtype=torch.long)
        ids = self._expand_and_tokenize(texts, grid, [len(x) for x in per_prompt])
        data.update(self._pad(ids, padding_side or "left", return_tensors))
        data.update(vision)
        if rgb_images and all(len(x) == 1 for x in per_prompt):
            data.update(self._sam_inputs(rgb_images))
        return BatchFeature(data=data)

    # ------------------------------------------------------------- outputs
    def post_process_masks(
        self,
        mask_logits: torch.Tensor | list[torch.Tensor],
        original_sizes: Any,
        reshaped_input_sizes: Any,
        threshold: float | None = 0.0,
    ) -> list[torch.Tensor]:
        """Mask-grid logits -> one (K, H, W) mask per image at its original size: bool, or
        the resized logits when `threshold` is None (`sam_frame.post_process_masks`)."""
        return post_process_masks(
            mask_logits, original_sizes, reshaped_input_sizes, self.sam_image_size, threshold
        )

    def parse_segmentation_response(self, text: str) -> ParsedResponse:
        """`parse_response` with this processor's reference token."""
        return parse_response(text, self.ref_token)

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "pixel_values",
            "image_grid_thw",
            "sam_pixel_values",
        ]


def build_tiny_processor(tokenizer, *, num_slots: int = 3) -> SegCompassProcessor:
    """The embedded default's processor; see `SegCompassProcessor.tiny`."""
    return SegCompassProcessor.tiny(tokenizer, num_slots=num_slots)


SegCompassProcessor.register_for_auto_class("AutoProcessor")
