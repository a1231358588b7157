"""The answer format of SegCompass: a chain of thought, then K reference tokens.

A completion reads ``<think> reasoning </think> [a few words] <REF_POS> ... <REF_POS>``
(arXiv 2605.22658, the method's data flow: the MLLM reasons, then emits the positions whose hidden states
ground the masks). This file is the one place that names the three answer tokens and parses
a completion; `segment`, the processor, the GRPO format reward, the CLI and the demo all read
a completion through `parse_answer` (text) or `parse_answer_ids` (token ids: a `<REF_POS>` is
then found by its id, never by text that merely spells it).

Two readings of a parsed answer:

* `grounding_problem`: why a completion cannot be grounded, None when it can (what
  `segment(strict_format=True)` enforces);
* `format_score`: the GRPO format reward in {0, 0.9, 1.0}, stricter, it grades style too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

THINK_START = "<think>"
THINK_END = "</think>"
REF_TOKEN = "<REF_POS>"
#: The tokens a SegCompass tokenizer adds to its VLM's vocabulary, in the order they are added.
ANSWER_TOKENS: tuple[str, ...] = (THINK_START, THINK_END, REF_TOKEN)

#: Thoughts longer than this many characters get format score 0.9 (the authors' reward).
MAX_THINK_CHARS = 2048
#: More words than this between `</think>` and the first `<REF_POS>` give 0.9 (the authors').
MAX_WORDS_BEFORE_REF = 10


@dataclass(frozen=True)
class ParsedAnswer:
    """A completion split at its answer tokens.

    Attributes:
        pieces: the completion in order: each piece is one of the answer tokens (as its
            string) or a run of ordinary text.
        thought: text inside the first `<think> ... </think>` block (stripped), None when
            there is no such block.
        thought_chars: length of that text before stripping (0 without a block).
        num_think_blocks: number of `<think>` tokens.
        num_think_ends: number of `</think>` tokens.
        num_ref: number of `<REF_POS>` tokens.
        refs_after_think: there is a `</think>` and every `<REF_POS>` comes after the last one.
        prefix: text before the first `<think>` (stripped; all the text when there is none).
        between: text from the last `</think>` to the first `<REF_POS>` after it (stripped).
    """

    pieces: tuple[str, ...]
    thought: str | None
    thought_chars: int
    num_think_blocks: int
    num_think_ends: int
    num_ref: int
    refs_after_think: bool
    prefix: str
    between: str

    @property
    def text(self) -> str:
        """The completion as text, answer tokens written out."""
        return "".join(self.pieces)


@dataclass(frozen=True)
class AnswerTokenIds:
    """The ids of the answer tokens in one tokenizer (the config's `*_token_id` fields)."""

    ref: int
    think_start: int | None = None
    think_end: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> AnswerTokenIds:
        return cls(
            ref=config.ref_token_id,
            think_start=config.think_start_token_id,
            think_end=config.think_end_token_id,
        )


def _from_pieces(parts: Sequence[tuple[bool, str]], ref_token: str) -> ParsedAnswer:
    """Derive every field from the ordered (is an answer token, text) parts."""
    pieces = tuple(text for _, text in parts)
    starts = [i for i, (token, p) in enumerate(parts) if token and p == THINK_START]
    ends = [i for i, (token, p) in enumerate(parts) if token and p == THINK_END]
    refs = [i for i, (token, p) in enumerate(parts) if token and p == ref_token]
    thought, thought_chars = None, 0
    if starts:
        close = next((i for i in ends if i > starts[0]), None)
        if close is not None:
            raw = "".join(pieces[starts[0] + 1 : close])
            thought, thought_chars = raw.strip(), len(raw)
    prefix = "".join(pieces[: starts[0]] if starts else pieces).strip()
    between = ""
    if ends:
        after = [i for i in refs if i > ends[-1]]
        stop = after[0] if after else len(pieces)
        between = "".join(pieces[ends[-1] + 1 : stop]).strip()
    return ParsedAnswer(
        pieces=pieces,
        thought=thought,
        thought_chars=thought_chars,
        num_think_blocks=len(starts),
        num_think_ends=len(ends),
        num_ref=len(refs),
        refs_after_think=bool(ends) and bool(refs) and refs[0] > ends[-1],
        prefix=prefix,
        between=between,
    )


def parse_answer(text: str, ref_token: str = REF_TOKEN) -> ParsedAnswer:
    """Parse a completion given as text (answer tokens written out, e.g. decoded with
    ``skip_special_tokens=False``).

    >>> a = parse_answer("<think> red is left </think> <REF_POS>")
    >>> (a.thought, a.num_ref, a.refs_after_think)
    ('red is left', 1, True)
    """
    if not isinstance(text, str):
        raise TypeError(f"Expected the completion to be a str, got {type(text).__name__}.")
    tokens = sorted({THINK_START, THINK_END, ref_token}, key=len, reverse=True)
    pattern = "(" + "|".join(re.escape(t) for t in tokens) + ")"
    # re.split with one group: the answer tokens are the odd pieces
    parts = [(i % 2 == 1, p) for i, p in enumerate(re.split(pattern, text)) if p]
    return _from_pieces(parts, ref_token)


def parse_answer_ids(
    token_ids: Sequence[int],
    ids: AnswerTokenIds,
    decode: Callable[[list[int]], str],
    ref_token: str = REF_TOKEN,
) -> ParsedAnswer:
    """Parse a completion given as token ids: answer tokens are found by id, the text
    between them is `decode`d run by run (e.g. ``lambda t: tokenizer.decode(t)``).

    Text that merely spells an answer token (``"<", "REF", "_POS", ">"``) stays text.
    """
    markers = {ids.ref: ref_token}
    if ids.think_start is not None:
        markers[ids.think_start] = THINK_START
    if ids.think_end is not None:
        markers[ids.think_end] = THINK_END
    parts: list[tuple[bool, str]] = []
    run: list[int] = []
    for token in (int(t) for t in token_ids):
        if token in markers:
            if run:
                parts.append((False, decode(run)))
                run = []
            parts.append((True, markers[token]))
        else:
            run.append(token)
    if run:
        parts.append((False, decode(run)))
    return _from_pieces(parts, ref_token)


def _as_parsed(answer: ParsedAnswer | str) -> ParsedAnswer:
    return answer if isinstance(answer, ParsedAnswer) else parse_answer(answer)


def grounding_problem(answer: ParsedAnswer | str, num_slots: int) -> str | None:
    """Why a completion cannot be grounded, or None when its format allows it.

    The rules: at least one `<REF_POS>`; exactly one `</think>`; at most one `<think>`, before
    `</think>` (a chat template may open the thought in the prompt); no `<REF_POS>` inside the
    thought; at most `num_slots` `<REF_POS>` tokens.

    >>> grounding_problem("<think>a red circle</think><REF_POS>", 3) is None
    True
    """
    a = _as_parsed(answer)
    if a.num_ref == 0:
        return "no <REF_POS> token in the completion, so no slot is grounded"
    if a.num_think_ends != 1 or a.num_think_blocks > 1:
        return (
            f"the completion breaks the format: it needs one <think>...</think> block before "
            f"its <REF_POS> tokens but has {a.num_think_blocks} <think> and "
            f"{a.num_think_ends} </think> tags, so its reasoning did not finish and no slot "
            "is grounded"
        )
    if a.num_think_blocks == 1 and a.thought is None:  # the only <think> is after </think>
        return "the completion breaks the format: </think> comes before <think>"
    if not a.refs_after_think:
        return (
            "the completion breaks the format: a <REF_POS> token stands inside the "
            "<think>...</think> block, before the reasoning ends"
        )
    if a.num_ref > num_slots:
        return (
            f"the completion breaks the format: it has {a.num_ref} <REF_POS> tokens but the "
            f"model has {num_slots} slots"
        )
    return None


def format_score(answer: ParsedAnswer | str, num_ref: int = 1) -> float:
    """Format score of one completion, in {0.0, 0.9, 1.0} (the authors' format reward).

    0.0 unless all hold: exactly one `<think>` and one `</think>` forming one block whose
    content is not blank; exactly `num_ref` `<REF_POS>` tokens; the first of them after
    `</think>`. Otherwise 0.9 if the thought exceeds 2048 characters, or non-whitespace text
    stands before `<think>`, or more than 10 whitespace-separated words stand between
    `</think>` and the first `<REF_POS>`; else 1.0. Text after the last `<REF_POS>` is not
    penalised (as the authors' code). The authors require exactly one `<REF_POS>`; `num_ref`
    generalises it to K slots. A stray second `<think>` or `</think>` makes the format invalid.

    Examples:
        >>> format_score("<think>red circle, left</think> It is <REF_POS>")
        1.0
        >>> format_score("Sure. <think>red circle</think><REF_POS>")
        0.9
        >>> format_score("<think> </think><REF_POS>")
        0.0
        >>> format_score("<think>two cats</think><REF_POS><REF_POS>", num_ref=2)
        1.0
    """
    if not isinstance(answer, (str, ParsedAnswer)):
        raise TypeError(f"`answer` must be a str or a ParsedAnswer; got {type(answer).__name__}.")
    if isinstance(num_ref, bool) or not isinstance(num_ref, int) or num_ref < 1:
        raise ValueError(f"`num_ref` must be an int >= 1 (reference tokens); got {num_ref!r}.")
    a = _as_parsed(answer)
    if a.num_think_blocks != 1 or a.num_think_ends != 1 or not a.thought:
        return 0.0  # also a `</think>` before the `<think>`: no block, thought None
    if a.num_ref != num_ref or not a.refs_after_think:
        return 0.0
    words_between = len(a.between.split())
    if a.thought_chars > MAX_THINK_CHARS or a.prefix or words_between > MAX_WORDS_BEFORE_REF:
        return 0.9
    return 1.0


def _think_blocks(text: str) -> list[tuple[int, int]]:
    """(start, end) of each `<think> ... </think>` pair, every `<think>` closed by the FIRST
    `</think>` after it and the next pair searched after that close (a non-greedy scan)."""
    blocks, pos = [], 0
    while (start := text.find(THINK_START, pos)) >= 0:
        close = text.find(THINK_END, start + len(THINK_START))
        if close < 0:
            break
        blocks.append((start, close + len(THINK_END)))
        pos = close + len(THINK_END)
    return blocks


def upstream_format_score(text: str) -> float:
    """The format reward of the authors' code (`verl/utils/reward_score/rseg_cot.py`), on text.

    0.0 unless: the non-overlapping `<think> ... </think>` pairs (each `<think>` closed by the
    first `</think>` after it) number exactly one and hold non-whitespace; the text holds
    exactly one `<REF_POS>`, after that block. Then 0.9 if the block's content exceeds 2048
    characters, non-whitespace stands before `<think>`, or more than 10 words stand between
    `</think>` and `<REF_POS>`; else 1.0. Unlike `format_score` it wants one `<REF_POS>`
    whatever the number of slots, and lets stray tags pass when the pairing still finds one
    block (`"<think>a<think>b</think>"` is one block with content `"a<think>b"`).

    >>> upstream_format_score("<think>red circle</think> <REF_POS>")
    1.0
    >>> upstream_format_score("<think>two</think><REF_POS><REF_POS>")
    0.0
    """
    if not isinstance(text, str):
        raise TypeError(f"Expected the completion to be a str, got {type(text).__name__}.")
    blocks = _think_blocks(text)
    if len(blocks) != 1:
        return 0.0
    start, end = blocks[0]
    content = text[start + len(THINK_START) : end - len(THINK_END)]
    if not content.strip() or text.count(REF_TOKEN) != 1:
        return 0.0
    ref = text.index(REF_TOKEN)
    if ref < end:
        return 0.0
    long_thought = len(content) > MAX_THINK_CHARS
    words_between = len(text[end:ref].split())
    if long_thought or text[:start].strip() or words_between > MAX_WORDS_BEFORE_REF:
        return 0.9
    return 1.0


__all__ = [
    "ANSWER_TOKENS",
    "MAX_THINK_CHARS",
    "MAX_WORDS_BEFORE_REF",
    "REF_TOKEN",
    "THINK_END",
    "THINK_START",
    "AnswerTokenIds",
    "ParsedAnswer",
    "format_score",
    "grounding_problem",
    "parse_answer",
    "parse_answer_ids",
    "upstream_format_score",
]
