"""Loader of ReasonSeg (LISA layout): ``<stem>.jpg`` next to ``<stem>.json`` per split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .common import DatasetFormatError, OnError, _read_json, _short
from .masks import _int_points
from .record import RecordList, SegmentationRecord, _ErrorPolicy, _ReasonSegGeometry


def load_reasonseg(
    root: str | Path,
    split: str,
    *,
    per_sentence: bool = False,
    on_error: OnError = "raise",
) -> RecordList:
    """Load a ReasonSeg split (LISA layout).

    Args:
        root: a folder holding ``reason_seg/ReasonSeg/<split>``, ``ReasonSeg/<split>`` or
            ``<split>`` directly.
        split: ``"train"``, ``"val"`` or ``"test"`` (any sub-folder name is accepted).
        per_sentence: one record per text instead of one per image. The default follows
            LISA's evaluation, which uses ``text[0]`` of each image.
        on_error: ``"raise"`` on the first malformed record, or ``"skip"`` it and list it
            in ``RecordList.skipped``.

    Returns:
        Records sorted by image stem; each has one mask (N=1) with 0/1/255 values.
    """
    policy = _ErrorPolicy(on_error)
    root = Path(root)
    candidates = [
        root / "reason_seg" / "ReasonSeg" / split,
        root / "ReasonSeg" / split,
        root / split,
    ]
    split_dir = next((c for c in candidates if c.is_dir()), None)
    if split_dir is None:
        raise FileNotFoundError(
            f"no ReasonSeg split folder for split {split!r}; looked in "
            + ", ".join(str(c) for c in candidates)
        )
    records: list[SegmentationRecord] = []
    for image_path in sorted(split_dir.glob("*.jpg")):
        json_path = image_path.with_suffix(".json")
        stem = image_path.stem
        try:
            if not json_path.is_file():
                raise ValueError(f"the annotation {json_path.name} next to the image is missing")
            try:
                anno = _read_json(json_path)
            except json.JSONDecodeError as error:
                raise ValueError(f"is not valid JSON ({error})") from None
            if not isinstance(anno, dict):
                raise ValueError(f"expected a JSON object, got {type(anno).__name__}")
            for key in ("text", "shapes"):
                if key not in anno:
                    raise ValueError(
                        f"is missing the key {key!r}; expected 'text', 'is_sentence' and 'shapes'"
                    )
            texts = anno["text"]
            if isinstance(texts, str):
                texts = [texts]
            if (
                not isinstance(texts, list)
                or not texts
                or not all(isinstance(t, str) for t in texts)
            ):
                raise ValueError(f"'text' must be a non-empty list of strings, got {_short(texts)}")
            shapes = anno["shapes"]
            if not isinstance(shapes, list):
                raise ValueError(f"'shapes' must be a list, got {_short(shapes)}")
            target_points: list[tuple[int, int]] = []
            for index, shape in enumerate(shapes):
                if not isinstance(shape, dict) or "label" not in shape or "points" not in shape:
                    raise ValueError(
                        f"shape {index} needs 'label' and 'points', got {_short(shape)}"
                    )
                try:
                    points = _int_points(shape["points"])
                except ValueError as error:
                    raise ValueError(f"shape {index}: {error}") from None
                label = str(shape["label"]).lower()
                if label != "flag" and "ignore" not in label:
                    target_points.extend(points)
            try:
                with Image.open(image_path) as image:
                    # the size as shown (EXIF orientation applied), the frame of the polygons
                    width, height = ImageOps.exif_transpose(image).size
            except OSError as error:
                raise ValueError(f"the image {image_path.name} cannot be read ({error})") from None
            is_sentence = anno.get("is_sentence")
        except ValueError as error:
            policy.handle(DatasetFormatError(json_path, stem, str(error)))
            continue
        bboxes = []
        if target_points:
            xs = np.clip([p[0] for p in target_points], 0, width - 1)
            ys = np.clip([p[1] for p in target_points], 0, height - 1)
            bboxes = [
                [
                    float(xs.min()),
                    float(ys.min()),
                    float(xs.max() - xs.min()),
                    float(ys.max() - ys.min()),
                ]
            ]
        common = dict(
            source="reasonseg",
            split=split,
            image_path=str(image_path),
            texts=list(texts),
            height=height,
            width=width,
            num_objects=1,
            bboxes=bboxes,
            is_sentence=None if is_sentence is None else bool(is_sentence),
            geometry=_ReasonSegGeometry(tuple(shapes)),
        )
        if per_sentence:
            for index, text in enumerate(texts):
                records.append(SegmentationRecord(record_id=f"{stem}:{index}", text=text, **common))
        else:
            records.append(SegmentationRecord(record_id=stem, text=texts[0], **common))
    return policy.finish(records, f"ReasonSeg {split} ({split_dir})")
