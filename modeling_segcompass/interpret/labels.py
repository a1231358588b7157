"""Concept labels: what each SAE latent fires on, over a dataset, stored with the model.

arXiv 2605.22658 claims that every mask can be traced to SAE concepts (the paper's
interpretability claim). A latent id alone says nothing to a reader, so this module scans
a dataset once and records, for each latent, the text tokens and the image patches that
activate it most. The result is a small JSON side file, ``concept_labels.json``, saved in
the model folder, so that `interpret.explain` can name concepts offline (no dataset needed
at explanation time).

Token roles (shared with `interpret.explain`): every position of a SegCompass sequence is
one of ``"visual"`` (an image placeholder token, i.e. one merged image patch), ``"prompt"``
(instruction and chat scaffold), ``"cot"`` (inside ``<think> ... </think>``, tags included),
``"ref"`` (a `<REF_POS>` token), ``"answer"`` (other response tokens) or ``"pad"``.

Library side: may use anything installed (only torch and the standard library here).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..modeling_segcompass import _decoder_layers

logger = logging.getLogger(__name__)

CONCEPT_LABELS_NAME = "concept_labels.json"
"""File name of the side file in a model folder."""
_FORMAT = "segcompass-concept-labels"
_VERSION = 1
TOKEN_KINDS = ("visual", "prompt", "cot", "ref", "answer", "pad")
# Keys of a processor batch that the VLM pass needs; everything else is ignored here.
_VLM_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


# --------------------------------------------------------------------------- token roles
@dataclass
class TokenInfo:
    """One position of a sequence, described for humans.

    Attributes:
        position: index in the sequence.
        token_id: the token id.
        token: its text (``"patch(r,c)"`` for visual tokens, ``"id{n}"`` without tokenizer).
        kind: one of `TOKEN_KINDS`.
        patch: (frame, row, col) on the merged patch grid for visual tokens, else None.
    """

    position: int
    token_id: int
    token: str
    kind: str
    patch: tuple[int, int, int] | None = None


def _merge_size(config: Any) -> int:
    vision = getattr(getattr(config, "vlm_config", None), "vision_config", None)
    return int(getattr(vision, "spatial_merge_size", 1) or 1)


class _TokenText:
    """Cached id -> text (decoding one token at a time is slow for long scans)."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            if self.tokenizer is None:
                text = f"id{token_id}"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False).strip()
                text = text or "\u2423"  # a whitespace-only token (shown as an open box)
            self.cache[token_id] = text
        return self.cache[token_id]


def describe_tokens(
    input_ids: torch.Tensor,
    config: Any,
    *,
    attention_mask: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    tokenizer: Any | None = None,
    _text: _TokenText | None = None,
) -> list[list[TokenInfo]]:
    """Role, text and image-patch position of every token of a batch.

    Visual tokens (``config.image_token_id``) are numbered in order and mapped to
    (frame, row, col) on the merged patch grid: image ``i`` of the batch has
    ``image_grid_thw[i] = (t, h, w)`` raw patches, i.e. ``t * (h/m) * (w/m)`` tokens with
    ``m`` the vision merge size, laid out row-major. The response starts at the first
    ``<think>`` token (or the first `<REF_POS>` when there is no ``<think>``).

    Args:
        input_ids: (B, L).
        config: a `SegCompassConfig` (token ids and merge size).
        attention_mask: (B, L), 0 marks padding (kind ``"pad"``).
        image_grid_thw: (num_images, 3), in the order the images appear in the batch.
        tokenizer: turns ids into text (optional).

    Returns:
        One list of `TokenInfo` per row, one entry per position.
    """
    if input_ids.dim() != 2:
        raise ValueError(
            f"describe_tokens: expected input_ids (B, L), got {tuple(input_ids.shape)}."
        )
    text = _text or _TokenText(tokenizer)
    ids = input_ids.tolist()
    mask = attention_mask.tolist() if attention_mask is not None else None
    image_id = getattr(config, "image_token_id", None)
    if image_id is None:  # SegCompassConfig keeps it in the VLM's config
        image_id = getattr(getattr(config, "vlm_config", None), "image_token_id", None)
    ref_id = config.ref_token_id
    think_start = getattr(config, "think_start_token_id", None)
    think_end = getattr(config, "think_end_token_id", None)
    merge = _merge_size(config)
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw]
    image_index, used_in_image = 0, 0
    rows: list[list[TokenInfo]] = []
    for b, row in enumerate(ids):
        if think_start is not None and think_start in row:
            response_start = row.index(think_start)
        elif ref_id in row:
            response_start = row.index(ref_id)
        else:
            response_start = len(row)
        in_cot = False
        infos = []
        for pos, token_id in enumerate(row):
            patch = None
            if mask is not None and not mask[b][pos]:
                kind = "pad"
            elif image_id is not None and token_id == image_id:
                kind = "visual"
                if image_index < len(grids):
                    t, h, w = grids[image_index]
                    gh, gw = max(h // merge, 1), max(w // merge, 1)
                    frame, rest = divmod(used_in_image, gh * gw)
                    patch = (frame, *divmod(rest, gw))
                    used_in_image += 1
                    if used_in_image >= t * gh * gw:  # next visual token starts the next image
                        image_index, used_in_image = image_index + 1, 0
            elif token_id == ref_id:
                kind = "ref"
            elif token_id == think_start and pos >= response_start:
                kind, in_cot = "cot", True
            elif token_id == think_end and in_cot:
                kind, in_cot = "cot", False
            elif in_cot:
                kind = "cot"
            elif pos >= response_start:
                kind = "answer"
            else:
                kind = "prompt"
            label = f"patch({patch[1]},{patch[2]})" if patch is not None else text(token_id)
            infos.append(TokenInfo(pos, token_id, label, kind, patch))
        rows.append(infos)
    return rows


# --------------------------------------------------------------------------- sparse codes
@torch.no_grad()
def compute_concept_codes(
    model: Any, batch: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SAE codes of a batch, as `SegCompassForReasoningSegmentation.forward` computes them.

    Runs only the VLM (hook at ``config.sae_layer``) and `sae.encode`: no SAM, no slots, so
    a scan over a dataset costs one VLM pass per batch. Padding positions get value 0.

    Returns:
        (indices, values), each (B, L, n).
    """
    missing = [k for k in ("input_ids",) if k not in batch]
    if missing:
        raise ValueError(
            f"compute_concept_codes: the batch lacks {missing}; pass a SegCompassProcessor batch."
        )
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in _VLM_KEYS if batch.get(k) is not None}
    attention_mask = inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    layer = _decoder_layers(model.vlm)[model.config.sae_layer]
    handle = layer.register_forward_hook(hook)
    try:
        model.vlm.model(**inputs, use_cache=False)
    finally:
        handle.remove()
    codes = model.sae.encode(captured["hidden"])  # (B, L, n)
    values = codes.values * attention_mask.unsqueeze(-1).to(codes.values.dtype)
    return codes.indices, values


# --------------------------------------------------------------------------- labels
@dataclass
class TopToken:
    """A text token on which a latent fired strongly."""

    token: str
    token_id: int
    activation: float
    sample: int
    position: int
    kind: str


@dataclass
class TopPatch:
    """An image patch (a visual token) on which a latent fired strongly."""

    sample: int
    frame: int
    row: int
    col: int
    activation: float
    position: int


@dataclass
class ConceptLabel:
    """What one SAE latent fires on over the scanned dataset.

    Attributes:
        latent_id: the latent.
        label: short human label (the most frequent text token among the top activations,
            or one set by hand), None for a purely visual latent.
        num_fired: positions where the latent was active.
        frequency: num_fired / positions scanned.
        mean_activation: mean activation where active.
        max_activation: largest activation seen.
        visual_share: share of its firings on visual tokens.
        top_tokens: the strongest text-token activations, strongest first.
        top_patches: the strongest image-patch activations, strongest first.
    """

    latent_id: int
    label: str | None
    num_fired: int
    frequency: float
    mean_activation: float
    max_activation: float
    visual_share: float
    top_tokens: list[TopToken] = field(default_factory=list)
    top_patches: list[TopPatch] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConceptLabel:
        data = dict(data)
        data["top_tokens"] = [TopToken(**t) for t in data.get("top_tokens", [])]
        data["top_patches"] = [TopPatch(**p) for p in data.get("top_patches", [])]
        return cls(**data)


@dataclass
class ConceptLabels:
    """Labels of the latents that fired during the scan (others are absent).

    Attributes:
        latents: latent id -> `ConceptLabel`.
        d_sae: number of SAE latents of the model.
        sae_layer: the layer the SAE reads.
        num_samples, num_tokens: size of the scan (real tokens only).
        top_k: how many top tokens / patches were kept per latent.
    """

    latents: dict[int, ConceptLabel]
    d_sae: int
    sae_layer: int
    num_samples: int
    num_tokens: int
    top_k: int

    def __contains__(self, latent_id: object) -> bool:
        return latent_id in self.latents

    def __getitem__(self, latent_id: int) -> ConceptLabel:
        return self.latents[int(latent_id)]

    def __len__(self) -> int:
        return len(self.latents)

    def label(self, latent_id: int) -> str | None:
        """The short label of a latent (None when unknown or purely visual)."""
        entry = self.latents.get(int(latent_id))
        return None if entry is None else entry.label

    def set_label(self, latent_id: int, label: str) -> None:
        """Name a latent by hand (e.g. after inspecting its top patches)."""
        if int(latent_id) not in self.latents:
            raise KeyError(
                f"ConceptLabels.set_label: latent {latent_id} never fired during the scan; "
                f"known latents: {len(self.latents)} (e.g. {sorted(self.latents)[:5]})."
            )
        self.latents[int(latent_id)].label = label

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "d_sae": self.d_sae,
            "sae_layer": self.sae_layer,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "top_k": self.top_k,
            "latents": {str(k): v.to_dict() for k, v in sorted(self.latents.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "dict") -> ConceptLabels:
        if data.get("format") != _FORMAT:
            raise ValueError(
                f"{source}: not a SegCompass concept-label file (format={data.get('format')!r}, "
                f"expected {_FORMAT!r}); build one with build_concept_labels()."
            )
        if int(data.get("version", 0)) > _VERSION:
            raise ValueError(
                f"{source}: concept-label file version {data['version']} is newer than this "
                f"package understands ({_VERSION}); upgrade modeling_segcompass."
            )
        return cls(
            latents={int(k): ConceptLabel.from_dict(v) for k, v in data["latents"].items()},
            d_sae=int(data["d_sae"]),
            sae_layer=int(data["sae_layer"]),
            num_samples=int(data["num_samples"]),
            num_tokens=int(data["num_tokens"]),
            top_k=int(data["top_k"]),
        )


class _RunningTopK:
    """Per-latent top-k of (activation, record id), merged batch by batch without Python loops."""

    def __init__(self, d_sae: int, k: int) -> None:
        self.k = k
        self.values = torch.full((d_sae, k), float("-inf"))
        self.records = torch.full((d_sae, k), -1, dtype=torch.long)

    def update(self, latents: torch.Tensor, values: torch.Tensor, records: torch.Tensor) -> None:
        if latents.numel() == 0:
            return
        d_sae = self.values.shape[0]
        order = torch.argsort(values, descending=True, stable=True)
        latents, values, records = latents[order], values[order], records[order]
        order = torch.argsort(latents, stable=True)  # grouped by latent, strongest first
        latents, values, records = latents[order], values[order], records[order]
        counts = torch.bincount(latents, minlength=d_sae)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(latents.numel()) - starts[latents]
        keep = rank < self.k
        new_values = torch.full_like(self.values, float("-inf"))
        new_records = torch.full_like(self.records, -1)
        new_values[latents[keep], rank[keep]] = values[keep]
        new_records[latents[keep], rank[keep]] = records[keep]
        both_values = torch.cat([self.values, new_values], dim=1)  # (d_sae, 2k)
        both_records = torch.cat([self.records, new_records], dim=1)
        top = both_values.topk(self.k, dim=1)
        self.values = top.values
        self.records = both_records.gather(1, top.indices)


def _model_batches(batches: Iterable[Mapping[str, Any]], max_batches: int | None):
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                "build_concept_labels: expected batches of model inputs (dicts with input_ids, "
                f"attention_mask, pixel_values, image_grid_thw), got {type(batch).__name__}. Wrap "
                "a dataset of rows with DataLoader(dataset, collate_fn=SegCompassCollator(processor))."
            )
        yield batch


@torch.no_grad()
def build_concept_labels(
    model: Any,
    batches: Iterable[Mapping[str, Any]],
    tokenizer: Any | None = None,
    *,
    top_k: int = 10,
    max_batches: int | None = None,
) -> ConceptLabels:
    """Scan a dataset and record, for every SAE latent, its top text tokens and image patches.

    Args:
        model: a `SegCompassForReasoningSegmentation`.
        batches: model-input batches (a `DataLoader` with `SegCompassCollator`, or processor
            outputs). Responses should be included so that CoT tokens are scanned too.
        tokenizer: turns token ids into text (labels are ``id{n}`` without it).
        top_k: text tokens and image patches kept per latent.
        max_batches: stop after this many batches.

    Returns:
        `ConceptLabels` for every latent that fired at least once. A latent's ``label`` is the
        most frequent text among its top text tokens (ties: the stronger total activation).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"build_concept_labels: top_k must be an int >= 1, got {top_k!r}.")
    was_training = model.training
    model.eval()
    config = model.config
    d_sae = int(config.d_sae)
    text = _TokenText(tokenizer)
    top_text, top_visual = _RunningTopK(d_sae, top_k), _RunningTopK(d_sae, top_k)
    fired = torch.zeros(d_sae, dtype=torch.long)
    fired_visual = torch.zeros(d_sae, dtype=torch.long)
    total_activation = torch.zeros(d_sae, dtype=torch.float64)
    max_activation = torch.zeros(d_sae)
    records: list[TokenInfo] = []
    record_sample: list[int] = []
    num_samples = num_tokens = 0
    try:
        for batch in _model_batches(batches, max_batches):
            indices, values = compute_concept_codes(model, batch)
            indices, values = indices.cpu(), values.float().cpu()
            infos = describe_tokens(
                batch["input_ids"],
                config,
                attention_mask=batch.get("attention_mask"),
                image_grid_thw=batch.get("image_grid_thw"),
                _text=text,
            )
            batch_size, length, _ = indices.shape
            offset = len(records)
            for b, row in enumerate(infos):
                records.extend(row)
                record_sample.extend([num_samples + b] * len(row))
            is_visual = torch.tensor([[i.kind == "visual" for i in row] for row in infos])
            real = torch.tensor([[i.kind != "pad" for i in row] for row in infos])
            num_tokens += int(real.sum())
            num_samples += batch_size
            active = values > 0  # (B, L, n)
            b_idx, pos, slot = active.nonzero(as_tuple=True)
            latents = indices[b_idx, pos, slot]
            acts = values[b_idx, pos, slot]
            record_ids = offset + b_idx * length + pos
            visual = is_visual[b_idx, pos]
            fired += torch.bincount(latents, minlength=d_sae)
            fired_visual += torch.bincount(latents[visual], minlength=d_sae)
            total_activation.index_add_(0, latents, acts.double())
            max_activation.scatter_reduce_(0, latents, acts, reduce="amax")
            top_text.update(latents[~visual], acts[~visual], record_ids[~visual])
            top_visual.update(latents[visual], acts[visual], record_ids[visual])
    finally:
        model.train(was_training)

    latents_out: dict[int, ConceptLabel] = {}
    for latent in fired.nonzero().flatten().tolist():
        tokens = []
        for value, rec in zip(top_text.values[latent].tolist(), top_text.records[latent].tolist()):
            if rec < 0:
                continue
            info = records[rec]
            tokens.append(
                TopToken(
                    info.token, info.token_id, value, record_sample[rec], info.position, info.kind
                )
            )
        patches = []
        for value, rec in zip(
            top_visual.values[latent].tolist(), top_visual.records[latent].tolist()
        ):
            if rec < 0:
                continue
            info = records[rec]
            frame, row, col = info.patch if info.patch is not None else (0, -1, -1)
            patches.append(TopPatch(record_sample[rec], frame, row, col, value, info.position))
        count = int(fired[latent])
        latents_out[latent] = ConceptLabel(
            latent_id=latent,
            label=_short_label(tokens),
            num_fired=count,
            frequency=count / max(num_tokens, 1),
            mean_activation=float(total_activation[latent]) / count,
            max_activation=float(max_activation[latent]),
            visual_share=int(fired_visual[latent]) / count,
            top_tokens=tokens,
            top_patches=patches,
        )
    logger.info(
        "Concept labels: %d of %d latents fired over %d samples (%d tokens).",
        len(latents_out), d_sae, num_samples, num_tokens,
    )  # fmt: skip
    return ConceptLabels(
        latents=latents_out,
        d_sae=d_sae,
        sae_layer=int(config.sae_layer),
        num_samples=num_samples,
        num_tokens=num_tokens,
        top_k=top_k,
    )


def _short_label(tokens: list[TopToken]) -> str | None:
    """Most frequent token text among the top activations (ties: larger summed activation)."""
    if not tokens:
        return None
    counts = Counter(t.token for t in tokens)
    strength: dict[str, float] = {}
    for t in tokens:
        strength[t.token] = strength.get(t.token, 0.0) + t.activation
    return max(counts, key=lambda name: (counts[name], strength[name]))


# --------------------------------------------------------------------------- labels in words
ATTRIBUTE_FAMILIES = ("colour", "kind", "size", "position", "relation")
_CELL_ROWS = ("top", "", "bottom")
_CELL_COLS = ("left", "", "right")


@dataclass
class ConceptWords:
    """What a latent means, in the attribute words of a world.

    Attributes:
        latent_id: the latent.
        attribute: the attribute word that holds at least `min_share` of its top text-token
            activation (e.g. "red"), or for a purely visual latent the position words of the
            image cell holding that share of its top patches (e.g. "top left"); None when no
            word or cell dominates.
        family: the attribute's family (`ATTRIBUTE_FAMILIES`), None with no attribute.
        share: the attribute's share of the top activations.
        words: attribute word -> share of the top text-token activation.
        cells: image cell (position words, "center" in the middle) -> share of the top patch
            activation, on a 3 x 3 grid of the patch grid.
    """

    latent_id: int
    attribute: str | None
    family: str | None
    share: float
    words: dict[str, float]
    cells: dict[str, float]

    def describe(self) -> str:
        """A short phrase: ``colour "red" (92%)``, ``cells top left (80%)`` or the top words."""
        if self.attribute is not None and self.family is not None:
            if self.family == "position" and not self.words:
                return f"cells {self.attribute} ({self.share:.0%})"
            return f'{self.family} "{self.attribute}" ({self.share:.0%})'
        mixed = sorted({**self.words, **self.cells}.items(), key=lambda kv: -kv[1])[:2]
        return "mixed: " + ", ".join(f"{w} {v:.0%}" for w, v in mixed) if mixed else "no attribute"


def _cell_words(row: int, col: int, rows: int, cols: int) -> str:
    name = f"{_CELL_ROWS[min(3 * row // max(rows, 1), 2)]} {_CELL_COLS[min(3 * col // max(cols, 1), 2)]}"
    return name.strip() or "center"


def concepts_in_words(
    labels: ConceptLabels,
    vocabulary: Mapping[str, Iterable[str]],
    *,
    min_share: float = 0.5,
    grid: tuple[int, int] | None = None,
) -> dict[int, ConceptWords]:
    """Every labelled latent in the attribute words of a world.

    Args:
        labels: from `build_concept_labels` / `load_concept_labels`.
        vocabulary: family -> its words, e.g. ``{"colour": ["red", ...], "kind": [...],
            "size": [...], "position": ["top", "left", ...], "relation": ["above", ...]}``
            (`synthetic_vocabulary` gives the synthetic world's).
        min_share: share of the top activations a word (or cell) needs to be the attribute.
        grid: (rows, cols) of the merged patch grid (default: the largest row / col seen + 1).

    Returns:
        latent id -> `ConceptWords`. A latent with text tokens among its top activations is
        named by its words; a purely visual one by its image cells (family "position").
    """
    family_of = {w: f for f, words in vocabulary.items() for w in words}
    if grid is None:
        patches = [p for c in labels.latents.values() for p in c.top_patches if p.row >= 0]
        grid = (
            max((p.row for p in patches), default=0) + 1,
            max((p.col for p in patches), default=0) + 1,
        )
    out: dict[int, ConceptWords] = {}
    for latent, entry in labels.latents.items():
        text_total = sum(t.activation for t in entry.top_tokens)
        words: dict[str, float] = {}
        for t in entry.top_tokens:
            if t.token in family_of and text_total > 0:
                words[t.token] = words.get(t.token, 0.0) + t.activation / text_total
        patch_total = sum(p.activation for p in entry.top_patches if p.row >= 0)
        cells: dict[str, float] = {}
        for p in entry.top_patches:
            if p.row >= 0 and patch_total > 0:
                name = _cell_words(p.row, p.col, *grid)
                cells[name] = cells.get(name, 0.0) + p.activation / patch_total
        attribute, family, share = None, None, 0.0
        if entry.top_tokens:
            best = max(words.items(), key=lambda kv: kv[1], default=(None, 0.0))
            if best[0] is not None and best[1] >= min_share:
                attribute, family, share = best[0], family_of[best[0]], best[1]
        elif cells:
            best = max(cells.items(), key=lambda kv: kv[1])
            if best[1] >= min_share:
                attribute, family, share = best[0], "position", best[1]
        out[latent] = ConceptWords(latent, attribute, family, share, words, cells)
    return out


def synthetic_vocabulary() -> dict[str, list[str]]:
    """The attribute words of the synthetic world (`modeling_segcompass.data.synthetic`)."""
    from ..data.synthetic.config import PALETTE, RELATIONS, SHAPE_KINDS, SIZES

    return {
        "colour": list(PALETTE),
        "kind": [*SHAPE_KINDS, *(k + "s" for k in SHAPE_KINDS if k != "cross"), "crosses"],
        "size": list(SIZES),
        "position": ["top", "bottom", "left", "right", "center"],
        "relation": sorted(
            {w for phrase in RELATIONS.values() for w in phrase.split()} - {"left", "right"}
        ),
    }


def save_concept_labels(labels: ConceptLabels, folder: str | os.PathLike) -> Path:
    """Write ``concept_labels.json`` into `folder` (e.g. next to a saved model); returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONCEPT_LABELS_NAME
    path.write_text(json.dumps(labels.to_dict(), indent=1), encoding="utf-8")
    return path


def load_concept_labels(folder: str | os.PathLike) -> ConceptLabels:
    """Read ``concept_labels.json`` from a model folder (or the file itself)."""
    path = Path(folder)
    if path.is_dir():
        path = path / CONCEPT_LABELS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No concept labels at {path}. Build them with build_concept_labels(model, batches, "
            "tokenizer) and save_concept_labels(labels, model_folder)."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); rebuild the concept labels."
        ) from error
    return ConceptLabels.from_dict(data, source=str(path))


__all__ = [
    "ATTRIBUTE_FAMILIES",
    "CONCEPT_LABELS_NAME",
    "TOKEN_KINDS",
    "ConceptLabel",
    "ConceptLabels",
    "ConceptWords",
    "TokenInfo",
    "TopPatch",
    "TopToken",
    "build_concept_labels",
    "compute_concept_codes",
    "concepts_in_words",
    "describe_tokens",
    "load_concept_labels",
    "save_concept_labels",
    "synthetic_vocabulary",
]
