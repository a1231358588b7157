"""Loaders for the real reasoning/referring segmentation datasets, in one common schema.

Supported on-disk formats (see ``docs/data.md``):

* **ReasonSeg** (LISA): ``<root>/reason_seg/ReasonSeg/<split>/<stem>.jpg`` next to
  ``<stem>.json`` = ``{"text": [...], "is_sentence": bool, "shapes": [{"label", "points"}]}``.
  Masks are rasterised as LISA does: ``flag`` shapes skipped, polygons drawn largest first so
  smaller ones overwrite, 1 = target, 255 = ignore.
* **RefCOCO / RefCOCO+ / RefCOCOg** (refer API): ``<root>/<dataset>/refs(<splitBy>).p`` (or the
  same list as ``.json``) plus the COCO-style ``<root>/<dataset>/instances.json``.
* **gRefCOCO**: ``<root>/grefcoco/grefs(unc).json`` (or ``.p``) plus ``instances.json``;
  ``ann_id`` is a list, ``[-1]`` (or ``[]``) means "no target".

Every loader returns a :class:`RecordList` of :class:`SegmentationRecord`. Geometry is checked
when loading (so malformed records are reported by file and id); masks and images are
produced lazily, on access, because a full split does not fit in memory as dense masks.
Malformed input raises :class:`DatasetFormatError` (a ``ValueError``) naming the file and the
record; missing files raise ``FileNotFoundError``.

Pickled refs are read with an unpickler that refuses every global: the refs files hold only
lists, dicts, strings and numbers, so a global can only come from a tampered file.
COCO RLE and polygons are decoded here with numpy and PIL (no pycocotools, no cv2).

Modules: ``common`` (errors, helpers), ``masks`` (RLE, polygons, ReasonSeg shapes), ``record``
(the schema), ``refs`` (refer-API files), ``reasonseg`` and ``refcoco`` (the loaders).
"""

from .common import IGNORE_INDEX, DatasetFormatError, OnError, UnsafePickleError
from .masks import (
    decode_rle,
    encode_rle,
    polygons_to_mask,
    reasonseg_mask,
    segmentation_to_mask,
)
from .reasonseg import load_reasonseg
from .record import RecordList, SegmentationRecord, SkippedRecord, to_hf_dataset
from .refcoco import (
    DEFAULT_SPLIT_BY,
    GREFCOCO_SPLITS,
    REFCOCO_SPLIT_BY,
    load_grefcoco,
    load_refcoco,
)
from .refs import convert_refs_pickle_to_json, read_refs

__all__ = [
    "DEFAULT_SPLIT_BY",
    "GREFCOCO_SPLITS",
    "IGNORE_INDEX",
    "REFCOCO_SPLIT_BY",
    "DatasetFormatError",
    "OnError",
    "RecordList",
    "SegmentationRecord",
    "SkippedRecord",
    "UnsafePickleError",
    "convert_refs_pickle_to_json",
    "decode_rle",
    "encode_rle",
    "load_grefcoco",
    "load_reasonseg",
    "load_refcoco",
    "polygons_to_mask",
    "read_refs",
    "reasonseg_mask",
    "segmentation_to_mask",
    "to_hf_dataset",
]
