"""A tiny byte-level BPE tokenizer with Qwen2.5-VL's special-token layout, trained locally.

The embedded default works offline: it cannot download the Qwen
tokenizer, so it trains a small byte-level BPE on the synthetic world's text and wraps it in
`transformers.Qwen2TokenizerFast`. The pre-tokenizer, normaliser and decoder are Qwen2's, so
the tiny tokenizer behaves like the real one, only with a much smaller vocabulary.

Token layout (ids are fixed; `SegCompassConfig.tiny()` relies on them):

| id | token               | role                                          | special |
|----|---------------------|-----------------------------------------------|---------|
| 0  | `<|endoftext|>`     | pad and eos (and unk, as in Qwen2)            | yes     |
| 1  | `<|im_start|>`      | chat turn start                               | yes     |
| 2  | `<|im_end|>`        | chat turn end (generation stops here)         | yes     |
| 3  | `<|vision_start|>`  | before the image placeholders                 | yes     |
| 4  | `<|vision_end|>`    | after the image placeholders                  | yes     |
| 5  | `<|image_pad|>`     | one per merged image patch                    | yes     |
| 6  | `<|video_pad|>`     | unused here, kept for Qwen2.5-VL's config      | yes     |
| 7  | `<think>`           | opens the chain of thought                    | no      |
| 8  | `</think>`          | closes the chain of thought                   | no      |
| 9  | `<REF_POS>`         | one reference-position token per slot         | no      |

`<think>`, `</think>` and `<REF_POS>` are added tokens that are never split, but they are *not*
flagged special: TRL decodes completions with `skip_special_tokens=True` before calling the
reward functions, and the format reward (arXiv 2605.22658, training) must still see them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, Qwen2TokenizerFast

from ..answer_format import ANSWER_TOKENS
from ..processing_segcompass import QWEN_CONTROL_TOKENS, build_prompt

logger = logging.getLogger(__name__)

#: Control tokens of the Qwen2.5-VL chat format, flagged special (ids 0..6).
CONTROL_TOKENS: tuple[str, ...] = QWEN_CONTROL_TOKENS
#: Every added token, in id order: ``SPECIAL_TOKENS[i]`` has id ``i`` in the tiny tokenizer; the
#: answer tokens (`answer_format.ANSWER_TOKENS`, ids 7..9) are added but not flagged special.
SPECIAL_TOKENS: tuple[str, ...] = CONTROL_TOKENS + ANSWER_TOKENS

#: Qwen2's pre-tokenisation pattern (contractions, letter runs, single digits, punctuation, spaces).
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Qwen-style chat template. Unlike Qwen2.5-VL's own template it adds no default system
#: message (the tiny model's sequences stay short); a system message is rendered when given.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class SpecialTokenIds(NamedTuple):
    """Ids of the tokens SegCompass needs, read from a tokenizer (tiny or real).

    Fields map one to one onto `SegCompassConfig` / Qwen2.5-VL config fields:
    `pad_token_id`, `eos_token_id`, `im_start_token_id`, `im_end_token_id`,
    `vision_start_token_id`, `vision_end_token_id`, `image_token_id`, `video_token_id`,
    `think_start_token_id`, `think_end_token_id`, `ref_token_id`.
    """

    pad_token_id: int
    eos_token_id: int
    im_start_token_id: int
    im_end_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    image_token_id: int
    video_token_id: int
    think_start_token_id: int
    think_end_token_id: int
    ref_token_id: int


def special_token_ids(tokenizer) -> SpecialTokenIds:
    """Read the ids of SegCompass's tokens from ``tokenizer``.

    Raises:
        ValueError: if one of `SPECIAL_TOKENS` is not a single known token of the tokenizer
            (add it with ``tokenizer.add_tokens([...])`` and resize the model's embeddings).
    """
    ids = {}
    unk = tokenizer.unk_token_id
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == unk and token != tokenizer.unk_token):
            raise ValueError(
                f"Expected the tokenizer to know the token {token!r}, but it maps to "
                f"{token_id!r} (unknown). Add it with `tokenizer.add_tokens([{token!r}])` and "
                "resize the model's token embeddings."
            )
        ids[token] = int(token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids["<|endoftext|>"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else ids["<|endoftext|>"]
    return SpecialTokenIds(
        pad_token_id=int(pad),
        eos_token_id=int(eos),
        im_start_token_id=ids["<|im_start|>"],
        im_end_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        think_start_token_id=ids["<think>"],
        think_end_token_id=ids["</think>"],
        ref_token_id=ids["<REF_POS>"],
    )


#: How often the fixed chat scaffolding is added to the corpus, so that its words merge.
_SCAFFOLD_REPEATS = 4


def _scaffold_texts() -> list[str]:
    """Role names and the fixed prompt wording: every sequence contains them."""
    prompts = [build_prompt("x", k) for k in (1, 2)]
    return ["system\nuser\nassistant\n", *prompts] * _SCAFFOLD_REPEATS


def _training_texts(texts: Iterable[str]) -> Iterator[str]:
    """Yield the corpus with the added tokens blanked out, so BPE never learns pieces of them.

    The chat scaffolding (`_scaffold_texts`) comes first, so prompts tokenize compactly.
    """
    yield from _scaffold_texts()
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"Expected every training text to be a str, but item {index} is a "
                f"{type(text).__name__}. Pass an iterable of strings."
            )
        for token in SPECIAL_TOKENS:
            text = text.replace(token, " ")
        yield text


def build_tiny_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    save_dir: str | os.PathLike | None = None,
) -> Qwen2TokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a Qwen2.5-VL-style tokenizer.

    Args:
        texts: the training corpus (e.g. instructions, chains of thought, answers of the
            synthetic world). Added tokens inside the texts are ignored for training.
        vocab_size: the total vocabulary size, including the 256 byte symbols and the
            10 added tokens; it must be at least 266. A small corpus may end below it (BPE
            stops when no pair occurs twice).
        save_dir: when given, the tokenizer is saved there with `save_pretrained`.

    Returns:
        A `Qwen2TokenizerFast` whose added tokens have ids 0..9 in the order of
        `SPECIAL_TOKENS`, pad = eos = `<|endoftext|>`, and the Qwen-style `CHAT_TEMPLATE`.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(
            f"Expected vocab_size to be an int >= {min_size} (256 bytes + "
            f"{len(SPECIAL_TOKENS)} added tokens), got {vocab_size!r}."
        )
    if isinstance(texts, str):
        raise TypeError(
            "Expected an iterable of strings for texts, got a single str; wrap it: [text]."
        )

    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # first in the vocabulary: ids 0..9
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_texts(texts), trainer=trainer)

    vocab = bpe.get_vocab()
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if vocab.get(token) != expected_id:  # guards the layout SegCompassConfig.tiny() assumes
            raise RuntimeError(
                f"BPE training put {token!r} at id {vocab.get(token)}, not {expected_id}."
            )
    # The trained merges, in rank order, are read back from the model's serialisation.
    merges = _merges_of(bpe)

    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )
    tokenizer.add_special_tokens(
        {
            "extra_special_tokens": [
                AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS[1:]
            ]
        }
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ANSWER_TOKENS])
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != expected_id:
            raise RuntimeError(f"Wrapping moved {token!r} away from id {expected_id}.")
    logger.info("Trained a tiny BPE tokenizer with %d tokens.", len(tokenizer))

    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def _merges_of(bpe: Tokenizer) -> list[tuple[str, str]]:
    """The BPE merges of a trained `tokenizers.Tokenizer`, in rank order."""

    model = json.loads(bpe.to_str())["model"]
    merges = []
    for merge in model["merges"]:
        # tokenizers >= 0.20 serialises a merge as a pair, older versions as "a b".
        pair = tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1))
        merges.append(pair)
    return merges


def load_tokenizer(path: str | os.PathLike) -> Qwen2TokenizerFast:
    """Load a tokenizer saved by `build_tiny_tokenizer` (a thin `AutoTokenizer` call)."""
    return AutoTokenizer.from_pretrained(path)


#: Config fields that name tokens; `word_token_ids` turns words given for them into ids.
WORD_TOKEN_FIELDS = ("codebook_span_start_token_id", "codebook_span_end_token_ids")


def _word_token_id(tokenizer, field: str, word: str) -> int:
    """The id of ``word`` as the tokenizer encodes it after a space (``"answer"``), else of
    the token spelt ``word`` in its vocabulary (``"</think>"``, byte-level ``"Ġ"``)."""
    ids = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
    if word.strip() and len(ids) == 1:
        return int(ids[0])
    token_id = tokenizer.convert_tokens_to_ids(word)
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(token_id, int) and (token_id != unk or word == tokenizer.unk_token):
        return token_id
    pieces = tokenizer.convert_ids_to_tokens(ids)
    raise ValueError(
        f"{field}: {word!r} is neither one token after a space (the tokenizer encodes it as "
        f"{pieces}) nor a token of the vocabulary; give a word that is one token (e.g. "
        "answer), a token as the tokenizer spells it (e.g. </think>) or the token id."
    )


def word_token_ids(overrides: dict, tokenizer) -> dict:
    """``overrides`` with words given for `WORD_TOKEN_FIELDS` replaced by their token ids, for
    ``--config`` overrides (a field holds one token or a list of them).

    Raises:
        ValueError: a word is not one token.
    """
    resolved = dict(overrides)
    for field in WORD_TOKEN_FIELDS:
        value = resolved.get(field)
        if isinstance(value, str):
            resolved[field] = _word_token_id(tokenizer, field, value)
        elif isinstance(value, list):
            resolved[field] = [
                _word_token_id(tokenizer, field, v) if isinstance(v, str) else v for v in value
            ]
    return resolved
