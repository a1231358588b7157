"""Loaders of RefCOCO, RefCOCO+, RefCOCOg and gRefCOCO (refer-API refs plus COCO instances)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .common import DatasetFormatError, OnError, _is_int, _short
from .masks import _check_flat_polygon, decode_rle
from .record import RecordList, SegmentationRecord, _CocoGeometry, _ErrorPolicy
from .refs import _find_refs_file, _Instances, _read_instances, read_refs

REFCOCO_SPLIT_BY: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
}
"""Valid ``splitBy`` values per dataset (refer README)."""

DEFAULT_SPLIT_BY: dict[str, str] = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
"""The ``splitBy`` LISA and SegCompass use."""

GREFCOCO_SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB")
"""The only split names the gRefCOCO API accepts."""


def _check_annotation(ann: dict[str, Any], height: int, width: int) -> list[float]:
    """Validate an annotation's segmentation and bbox; return the bbox ``[x, y, w, h]``."""
    if "segmentation" not in ann:
        raise ValueError(f"annotation {ann.get('id')} has no 'segmentation'")
    segmentation = ann["segmentation"]
    parts = [segmentation] if isinstance(segmentation, Mapping) else segmentation
    if not isinstance(parts, Sequence) or isinstance(parts, str) or not parts:
        raise ValueError(
            f"annotation {ann.get('id')} has an empty or invalid segmentation {_short(segmentation)}"
        )
    for index, part in enumerate(parts):
        try:
            if isinstance(part, Mapping):
                size = part.get("size")
                if list(size or []) != [height, width]:
                    raise ValueError(
                        f"RLE size {size!r} differs from the image size [{height}, {width}]"
                    )
                decode_rle(part)
            else:
                _check_flat_polygon(part)
        except ValueError as error:
            raise ValueError(
                f"annotation {ann.get('id')}, segmentation part {index}: {error}"
            ) from None
    bbox = ann.get("bbox")
    if (
        not isinstance(bbox, Sequence)
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) for v in bbox)
    ):
        raise ValueError(f"annotation {ann.get('id')} has bbox {bbox!r}; expected [x, y, w, h]")
    return [float(v) for v in bbox]


def _ref_texts(ref: Mapping[str, Any], text_field: str) -> tuple[list[str], list[int]]:
    sentences = ref.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise ValueError("the ref has no 'sentences'; expected a non-empty list")
    sent_ids = ref.get("sent_ids") or []
    texts, ids = [], []
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, Mapping):
            raise ValueError(f"sentence {index} is {_short(sentence)}, expected a dict")
        text = sentence.get(text_field, sentence.get("sent"))
        if not isinstance(text, str):
            raise ValueError(f"sentence {index} has no string {text_field!r} or 'sent'")
        sent_id = sentence.get("sent_id", sent_ids[index] if index < len(sent_ids) else index)
        texts.append(text)
        ids.append(int(sent_id))
    return texts, ids


def _normalise_ann_ids(value: Any) -> list[int]:
    """gRefCOCO ``ann_id``: int or list; ``[-1]`` and ``[]`` mean no target (returns [])."""
    ids = [value] if _is_int(value) else value
    if not isinstance(ids, list) or not all(_is_int(v) for v in ids):
        raise ValueError(f"'ann_id' must be an int or a list of ints, got {_short(value)}")
    if -1 in ids:
        if len(ids) != 1:
            raise ValueError(f"'ann_id' {ids} mixes -1 (no target) with real annotation ids")
        return []
    return list(ids)


def _union_box(boxes: Sequence[Sequence[float]]) -> list[float]:
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    return [x0, y0, x1 - x0, y1 - y0]


def _records_from_refs(
    *,
    refs: list[dict[str, Any]],
    refs_path: Path,
    instances: _Instances,
    source: str,
    split: str | None,
    image_dir: Path,
    text_field: str,
    per_sentence: bool,
    multi_target: bool,
    union_targets: bool,
    policy: _ErrorPolicy,
) -> list[SegmentationRecord]:
    records: list[SegmentationRecord] = []
    for index, ref in enumerate(refs):
        if split is not None and ref.get("split") != split:
            continue
        ref_key = str(ref.get("ref_id", f"index {index}"))
        try:
            if not _is_int(ref.get("ref_id")) or not _is_int(ref.get("image_id")):
                raise ValueError("the ref needs integer 'ref_id' and 'image_id'")
            if multi_target:
                ann_ids = _normalise_ann_ids(ref.get("ann_id"))
            elif _is_int(ref.get("ann_id")) and ref["ann_id"] >= 0:
                ann_ids = [ref["ann_id"]]
            else:
                raise ValueError(f"'ann_id' must be an int >= 0, got {_short(ref.get('ann_id'))}")
            image = instances.images.get(ref["image_id"])
            if image is None:
                raise DatasetFormatError(
                    instances.path,
                    ref_key,
                    f"image_id {ref['image_id']} (from {refs_path.name}) is not in "
                    "instances.json 'images'",
                )
            height, width = int(image["height"]), int(image["width"])
            anns = []
            for ann_id in ann_ids:
                ann = instances.annotations.get(ann_id)
                if ann is None:
                    raise DatasetFormatError(
                        instances.path,
                        ref_key,
                        f"ann_id {ann_id} (from {refs_path.name}) is not in instances.json "
                        "'annotations'; the refs and instances files do not belong together",
                    )
                try:
                    bbox = _check_annotation(ann, height, width)
                except ValueError as error:
                    raise DatasetFormatError(instances.path, ref_key, str(error)) from None
                anns.append((ann, bbox))
            texts, sent_ids = _ref_texts(ref, text_field)
        except DatasetFormatError as error:
            policy.handle(error)
            continue
        except (ValueError, TypeError, KeyError) as error:
            policy.handle(DatasetFormatError(refs_path, ref_key, str(error)))
            continue

        if union_targets:
            # ReLA: one mask, the union of the non-crowd targets (of all targets when every
            # one is a crowd, so that such a ref is not mistaken for a no-target one).
            kept = [(a, b) for a, b in anns if not a.get("iscrowd", 0)] or anns
            geometry = _CocoGeometry(tuple(a["segmentation"] for a, _ in kept), union=True)
            bboxes = [_union_box([b for _, b in kept])] if kept else []
            num_objects = 1 if kept else 0
        else:
            geometry = _CocoGeometry(tuple(a["segmentation"] for a, _ in anns))
            bboxes = [b for _, b in anns]
            num_objects = len(anns)
        common = dict(
            source=source,
            split=str(ref.get("split")),
            image_path=str(image_dir / image["file_name"]),  # not the ref's "_<n>" name
            texts=texts,
            height=height,
            width=width,
            num_objects=num_objects,
            ann_ids=[int(a["id"]) for a, _ in anns],
            bboxes=bboxes,
            category_ids=[int(a.get("category_id", -1)) for a, _ in anns],
            image_id=int(ref["image_id"]),
            ref_id=int(ref["ref_id"]),
            sent_ids=sent_ids,
            geometry=geometry,
        )
        if per_sentence:
            for text, sent_id in zip(texts, sent_ids):
                records.append(
                    SegmentationRecord(
                        record_id=f"{ref['ref_id']}:{sent_id}", text=text, sent_id=sent_id, **common
                    )
                )
        else:
            records.append(
                SegmentationRecord(record_id=str(ref["ref_id"]), text=texts[0], **common)
            )
    return records


def _check_split(split: str | None, refs: list[dict[str, Any]], refs_path: Path) -> None:
    if split is None:
        return
    present = sorted({str(r.get("split")) for r in refs})
    if split not in present:
        raise ValueError(
            f"split {split!r} is not in {refs_path}; it has the splits {present}. "
            "Pass one of them (or split=None for all refs)."
        )


def load_refcoco(
    root: str | Path,
    dataset: Literal["refcoco", "refcoco+", "refcocog"] = "refcoco",
    *,
    split_by: str | None = None,
    split: str | None = "val",
    text_field: str = "raw",
    per_sentence: bool = True,
    image_dir: str | Path | None = None,
    on_error: OnError = "raise",
) -> RecordList:
    """Load RefCOCO, RefCOCO+ or RefCOCOg from the refer-API files.

    Args:
        root: folder holding ``<dataset>/refs(<split_by>).p`` (or ``.json``) and
            ``<dataset>/instances.json`` (LISA's ``refer_seg`` folder).
        dataset: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"``.
        split_by: ``unc``/``google`` (refcoco), ``unc`` (refcoco+), ``umd``/``google``
            (refcocog); defaults to LISA's choice (``umd`` for refcocog, else ``unc``).
        split: a split present in the refs (``train``, ``val``, ``testA``, ``testB``,
            ``test``), or ``None`` for every ref.
        text_field: sentence key used as text: ``"raw"`` (SegCompass, ReLA) or ``"sent"``
            (LISA); falls back to ``"sent"`` when missing.
        per_sentence: one record per sentence (evaluation convention) or one per ref.
        image_dir: COCO ``train2014`` folder; defaults to
            ``<root>/images/mscoco/images/train2014``.
        on_error: ``"raise"`` or ``"skip"`` malformed refs (listed in ``RecordList.skipped``).

    Returns:
        Records with one mask each (N=1), in refs-file order.
    """
    if dataset not in REFCOCO_SPLIT_BY:
        raise ValueError(
            f"dataset must be one of {sorted(REFCOCO_SPLIT_BY)}, got {dataset!r}; "
            "use load_grefcoco for gRefCOCO"
        )
    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    if split_by not in REFCOCO_SPLIT_BY[dataset]:
        raise ValueError(
            f"split_by {split_by!r} does not exist for {dataset}; choose one of "
            f"{list(REFCOCO_SPLIT_BY[dataset])}"
        )
    policy = _ErrorPolicy(on_error)
    root = Path(root)
    refs_path = _find_refs_file(root / dataset, f"refs({split_by})")
    refs = read_refs(refs_path)
    _check_split(split, refs, refs_path)
    instances = _read_instances(root / dataset / "instances.json")
    records = _records_from_refs(
        refs=refs,
        refs_path=refs_path,
        instances=instances,
        source=dataset,
        split=split,
        image_dir=Path(image_dir) if image_dir else root / "images/mscoco/images/train2014",
        text_field=text_field,
        per_sentence=per_sentence,
        multi_target=False,
        union_targets=False,
        policy=policy,
    )
    return policy.finish(records, f"{dataset} ({split_by}) {split} ({refs_path})")


def load_grefcoco(
    root: str | Path,
    split: str = "val",
    *,
    union_targets: bool = False,
    text_field: str = "raw",
    per_sentence: bool = True,
    image_dir: str | Path | None = None,
    on_error: OnError = "raise",
) -> RecordList:
    """Load gRefCOCO (multi-target and no-target referring expressions).

    Args:
        root: folder holding ``grefcoco/grefs(unc).json`` (or ``.p``) and
            ``grefcoco/instances.json``.
        split: one of ``train``, ``val``, ``testA``, ``testB``.
        union_targets: ``False`` keeps one mask per ``ann_id`` (SegCompass); ``True`` merges
            the non-crowd targets into one mask (ReLA).
        text_field: ``"raw"`` (default) or ``"sent"``.
        per_sentence: one record per sentence (ReLA evaluation) or one per ref (SegCompass
            training rows).
        image_dir: COCO ``train2014`` folder; defaults to
            ``<root>/images/mscoco/images/train2014``.
        on_error: ``"raise"`` or ``"skip"`` malformed refs.

    Returns:
        Records with N = number of targets (0 for no-target: ``ann_id`` ``[-1]`` or ``[]``).
    """
    if split not in GREFCOCO_SPLITS:
        raise ValueError(f"gRefCOCO split must be one of {list(GREFCOCO_SPLITS)}, got {split!r}")
    policy = _ErrorPolicy(on_error)
    root = Path(root)
    refs_path = _find_refs_file(root / "grefcoco", "grefs(unc)")
    refs = read_refs(refs_path)
    instances = _read_instances(root / "grefcoco" / "instances.json")
    records = _records_from_refs(
        refs=refs,
        refs_path=refs_path,
        instances=instances,
        source="grefcoco",
        split=split,
        image_dir=Path(image_dir) if image_dir else root / "images/mscoco/images/train2014",
        text_field=text_field,
        per_sentence=per_sentence,
        multi_target=True,
        union_targets=union_targets,
        policy=policy,
    )
    return policy.finish(records, f"gRefCOCO {split} ({refs_path})")
