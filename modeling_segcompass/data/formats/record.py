"""The common schema of every loader: `SegmentationRecord` (masks rasterised lazily from the
validated geometry), the `RecordList` a loader returns with what it skipped, the skip-or-raise
policy, and the conversion of records to a `datasets.Dataset`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .common import DatasetFormatError
from .masks import reasonseg_mask, segmentation_to_mask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkippedRecord:
    """A malformed record skipped under ``on_error="skip"``.

    Attributes:
        path: file the record came from.
        record_id: id of the record (image stem, ``ref_id`` or a list index).
        reason: the message the error would have had.
    """

    path: str
    record_id: str
    reason: str


class RecordList(list):
    """A ``list`` of :class:`SegmentationRecord` that also remembers what was skipped.

    Attributes:
        skipped: one :class:`SkippedRecord` per malformed source record skipped under
            ``on_error="skip"`` (one per image or ref, not per sentence).
    """

    def __init__(
        self,
        records: Iterable[SegmentationRecord] = (),
        skipped: Iterable[SkippedRecord] = (),
    ) -> None:
        super().__init__(records)
        self.skipped: list[SkippedRecord] = list(skipped)

    @property
    def num_skipped(self) -> int:
        """Number of malformed source records that were skipped."""
        return len(self.skipped)


class _ErrorPolicy:
    """Raises or collects :class:`DatasetFormatError` according to ``on_error``."""

    def __init__(self, on_error: str) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(
                f"on_error must be 'raise' or 'skip', got {on_error!r}. Use 'skip' to drop "
                "malformed records and count them in RecordList.skipped."
            )
        self.on_error = on_error
        self.skipped: list[SkippedRecord] = []

    def handle(self, error: DatasetFormatError) -> None:
        if self.on_error == "raise":
            raise error
        self.skipped.append(SkippedRecord(error.path, str(error.record_id), str(error)))

    def finish(self, records: list[SegmentationRecord], what: str) -> RecordList:
        if self.skipped:
            logger.warning(
                "%s: skipped %d malformed record(s); first: %s",
                what,
                len(self.skipped),
                self.skipped[0].reason,
            )
        return RecordList(records, self.skipped)


@dataclass(frozen=True)
class _CocoGeometry:
    """Per-object COCO segmentations; ``union`` merges them into one mask (ReLA)."""

    segmentations: tuple[Any, ...]
    union: bool = False

    def render(self, height: int, width: int) -> np.ndarray:
        masks = [segmentation_to_mask(s, height=height, width=width) for s in self.segmentations]
        if self.union:
            if not masks:
                return np.zeros((0, height, width), dtype=np.uint8)
            return np.bitwise_or.reduce(np.stack(masks), axis=0)[None]  # (1, H, W)
        if not masks:
            return np.zeros((0, height, width), dtype=np.uint8)
        return np.stack(masks)  # (N, H, W)


@dataclass(frozen=True)
class _ReasonSegGeometry:
    shapes: tuple[Mapping[str, Any], ...]

    def render(self, height: int, width: int) -> np.ndarray:
        return reasonseg_mask(self.shapes, height=height, width=width)[None]  # (1, H, W)


@dataclass
class SegmentationRecord:
    """One sample of a real segmentation dataset, in the schema shared by every loader.

    Attributes:
        record_id: unique id within the split: the image stem (ReasonSeg), ``"<ref_id>"``
            for one record per ref, or ``"<ref_id>:<sent_id>"`` for one record per sentence
            (ReasonSeg per sentence: ``"<stem>:<index>"``).
        source: ``"reasonseg"``, ``"refcoco"``, ``"refcoco+"``, ``"refcocog"`` or
            ``"grefcoco"``.
        split: the split name as on disk (e.g. ``"val"``, ``"testA"``).
        image_path: path of the image file (read lazily by :meth:`load_image`).
        text: the instruction of this record.
        texts: every text of the image (ReasonSeg) or ref (RefCOCO family).
        height: image height H.
        width: image width W.
        num_objects: number of masks N (``masks.shape[0]``): 1 for ReasonSeg and RefCOCO,
            the number of targets for gRefCOCO (0 = no target; 1 in union mode).
        ann_ids: COCO annotation ids of the targets (empty for ReasonSeg and no-target).
        bboxes: ``[x, y, w, h]`` per mask. COCO: the annotation ``bbox`` (union mode: the box
            around all targets). ReasonSeg: the box of the target polygons' vertices, or
            empty if the image has no target shape.
        category_ids: COCO category id per target (empty for ReasonSeg).
        image_id: COCO image id (``None`` for ReasonSeg).
        ref_id: refer ``ref_id`` (``None`` for ReasonSeg).
        sent_id: refer ``sent_id`` of :attr:`text` (``None`` for ReasonSeg and per-ref records).
        sent_ids: ``sent_id`` of every entry of :attr:`texts`.
        is_sentence: ReasonSeg's flag for long (sentence) queries; ``None`` elsewhere.
        geometry: the validated shapes :attr:`masks` is rasterised from (an implementation
            detail, shared by the per-sentence records of one image or ref).
    """

    record_id: str
    source: str
    split: str
    image_path: str
    text: str
    texts: list[str]
    height: int
    width: int
    num_objects: int
    ann_ids: list[int] = field(default_factory=list)
    bboxes: list[list[float]] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    image_id: int | None = None
    ref_id: int | None = None
    sent_id: int | None = None
    sent_ids: list[int] = field(default_factory=list)
    is_sentence: bool | None = None
    geometry: _CocoGeometry | _ReasonSegGeometry | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def masks(self) -> np.ndarray:
        """The ground-truth masks, rasterised on every access (not cached).

        Returns:
            uint8 array of shape (N, H, W) with N = :attr:`num_objects`. Values are 0/1;
            ReasonSeg also uses 255 for ignore regions. N = 0 for a no-target record.
        """
        if self.geometry is None:
            return np.zeros((0, self.height, self.width), dtype=np.uint8)
        return self.geometry.render(self.height, self.width)

    def load_image(self) -> Image.Image:
        """Open the image as RGB, upright: its EXIF orientation applied, as OpenCV's `imread`
        (LISA's reader) and annotation tools such as LabelMe show it."""
        path = Path(self.image_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"record {self.record_id!r} ({self.source} {self.split}): image {path} does not "
                "exist; pass image_dir= to the loader if the images live elsewhere"
            )
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")

    def to_dict(self) -> dict[str, Any]:
        """The plain fields (no masks, no image) as a dict."""
        return {
            name: getattr(self, name) for name in self.__dataclass_fields__ if name != "geometry"
        }


def to_hf_dataset(records: Iterable[SegmentationRecord], *, include_masks: bool = True):
    """Turn records into a ``datasets.Dataset`` (needs the ``datasets`` package).

    Columns: every :class:`SegmentationRecord` field, ``image`` (a lazily decoded
    ``datasets.Image`` pointing at ``image_path``) and, with ``include_masks``, ``masks``: a
    list of N grayscale PIL images (values 0/1/255 kept). Missing ints are stored as -1.

    Rasterises every record's masks, so use it on a split, not on all of COCO at once.
    """
    import datasets  # library-side optional dependency

    columns: dict[str, Any] = {
        "record_id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "split": datasets.Value("string"),
        "image": datasets.Image(),
        "image_path": datasets.Value("string"),
        "text": datasets.Value("string"),
        "texts": datasets.List(datasets.Value("string")),
        "height": datasets.Value("int32"),
        "width": datasets.Value("int32"),
        "num_objects": datasets.Value("int32"),
        "ann_ids": datasets.List(datasets.Value("int64")),
        "bboxes": datasets.List(datasets.List(datasets.Value("float32"))),
        "category_ids": datasets.List(datasets.Value("int64")),
        "image_id": datasets.Value("int64"),
        "ref_id": datasets.Value("int64"),
        "sent_id": datasets.Value("int64"),
        "sent_ids": datasets.List(datasets.Value("int64")),
        "is_sentence": datasets.Value("bool"),
    }
    if include_masks:
        columns["masks"] = datasets.List(datasets.Image())
    rows = []
    for record in records:
        row = record.to_dict()
        for key in ("image_id", "ref_id", "sent_id"):
            row[key] = -1 if row[key] is None else row[key]
        row["image"] = {"path": record.image_path, "bytes": None}
        if include_masks:
            row["masks"] = [Image.fromarray(m) for m in record.masks]
        rows.append(row)
    return datasets.Dataset.from_list(rows, features=datasets.Features(columns))
