"""Loaders for the real reasoning/referring segmentation datasets, in one common schema.

Supported on-disk formats (see ``docs/data.md`` and the fact sheet ``DATA_FORMATS.md``):

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

Pickled refs are read with an unpickler that refuses every global: the refs files hold only
lists, dicts, strings and numbers, so a global can only come from a tampered file.
COCO RLE and polygons are decoded here with numpy and PIL (no pycocotools, no cv2).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
"""Mask value of ReasonSeg ``ignore`` regions; evaluation excludes these pixels (LISA)."""

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

OnError = Literal["raise", "skip"]


# ----------------------------------------------------------------------------- errors


class DatasetFormatError(ValueError):
    """A record (or file) does not follow the expected on-disk format.

    Attributes:
        path: the file the problem was found in.
        record_id: the id of the offending record (``None`` for file-level problems).
        problem: what was expected and what was found.
    """

    def __init__(self, path: str | Path, record_id: str | None, problem: str) -> None:
        self.path = str(path)
        self.record_id = record_id
        self.problem = problem
        where = f"{path}" if record_id is None else f"{path}: record {record_id!r}"
        super().__init__(f"{where}: {problem}")


class UnsafePickleError(DatasetFormatError):
    """A pickle asked to load a global (class or function); it was refused, nothing ran."""

    def __init__(self, path: str | Path, global_name: str) -> None:
        self.global_name = global_name
        super().__init__(
            path,
            None,
            f"refused to load the global {global_name!r} from this pickle. A refs file holds "
            "only lists, dicts, strings and numbers, so this file was tampered with or is not "
            "a refs file; nothing from it was executed. Use a refs file from the original "
            "release, or the same refs saved as JSON (see convert_refs_pickle_to_json).",
        )


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


# ----------------------------------------------------------------------------- COCO RLE


def _counts_from_string(counts: str) -> list[int]:
    """Parse COCO's compressed RLE string (pycocotools ``rleFrString``).

    Each count is a little-endian run of 5-bit groups offset by 48 ('0'); bit 0x20 means "more
    groups follow" and bit 0x10 of the last group is the sign. From the 4th count on, the
    value is stored as a difference to the count two places earlier.
    """
    values: list[int] = []
    pos = 0
    while pos < len(counts):
        value = 0
        shift = 0
        more = True
        while more:
            if pos >= len(counts):
                raise ValueError(
                    f"compressed RLE string ends inside a count (after {len(values)} counts)"
                )
            char = ord(counts[pos]) - 48
            if not 0 <= char < 64:
                raise ValueError(
                    f"compressed RLE string has the character {counts[pos]!r} at {pos}; "
                    "expected characters in the range '0'..'o'"
                )
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            pos += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return values


def _counts_to_string(counts: Sequence[int]) -> str:
    """Inverse of :func:`_counts_from_string` (pycocotools ``rleToString``)."""
    chars: list[str] = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        more = True
        while more:
            char = value & 0x1F
            value >>= 5
            more = value != -1 if char & 0x10 else value != 0
            if more:
                char |= 0x20
            chars.append(chr(char + 48))
    return "".join(chars)


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode one COCO run-length encoding into a binary mask.

    Args:
        rle: ``{"size": [height, width], "counts": ...}`` where ``counts`` is either the
            compressed string (``str`` or ``bytes``, as written by pycocotools) or the
            uncompressed list of run lengths (``iscrowd`` annotations). Runs alternate
            0, 1, 0, ... starting with zeros, over the pixels in column-major order.

    Returns:
        uint8 array of shape (height, width) with values 0 and 1.

    Raises:
        ValueError: if the size or counts are malformed or the runs do not cover the image.
    """
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"expected an RLE dict with keys 'size' and 'counts', got {_short(rle)}")
    size = rle["size"]
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int) and v >= 0 for v in size)
    ):
        raise ValueError(f"RLE 'size' must be [height, width] of ints >= 0, got {size!r}")
    height, width = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        runs = _counts_from_string(counts)
    elif isinstance(counts, Sequence) and all(isinstance(c, int) for c in counts):
        runs = [int(c) for c in counts]
    else:
        raise ValueError(
            f"RLE 'counts' must be a compressed string or a list of ints, got {_short(counts)}"
        )
    if any(r < 0 for r in runs):
        raise ValueError(f"RLE has a negative run length: {runs}")
    if sum(runs) != height * width:
        raise ValueError(
            f"RLE runs cover {sum(runs)} pixels but size {height}x{width} has "
            f"{height * width}; the counts do not belong to this size"
        )
    values = np.arange(len(runs), dtype=np.int64) % 2  # 0, 1, 0, ... starting with zeros
    flat = np.repeat(values.astype(np.uint8), runs)
    return flat.reshape((height, width), order="F")  # (H, W) from column-major runs


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a binary mask as a compressed COCO RLE (inverse of :func:`decode_rle`).

    Args:
        mask: array of shape (height, width); nonzero pixels are foreground.

    Returns:
        ``{"size": [height, width], "counts": str}``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D (height, width) mask, got shape {mask.shape}")
    flat = (mask != 0).reshape(-1, order="F").astype(np.int8)  # (H*W,) column-major
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]  # runs always start with a (possibly empty) run of zeros
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _counts_to_string(runs)}


# ----------------------------------------------------------------------------- polygons


def _draw_polygon(draw: ImageDraw.ImageDraw, points: Sequence[tuple[float, float]], value: int):
    """Fill a closed polygon and its 1-px outline (cv2 ``fillPoly`` + ``polylines``)."""
    if len(points) == 1:
        draw.point(points, fill=value)
    elif len(points) == 2:
        draw.line(points, fill=value, width=1)
    else:
        draw.polygon(points, fill=value, outline=value)


def _check_flat_polygon(polygon: Any) -> list[tuple[float, float]]:
    """Validate a COCO polygon ``[x1, y1, x2, y2, ...]`` and return its points."""
    if not isinstance(polygon, Sequence) or isinstance(polygon, str):
        raise ValueError(
            f"a polygon must be a flat list [x1, y1, x2, y2, ...], got {_short(polygon)}"
        )
    if len(polygon) % 2:
        raise ValueError(
            f"a polygon has an odd number of coordinates ({len(polygon)}); expected pairs "
            "x1, y1, x2, y2, ..."
        )
    if len(polygon) < 2:
        raise ValueError("a polygon is empty; expected at least one (x, y) pair")
    if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in polygon):
        raise ValueError(f"a polygon has non-numeric or non-finite coordinates: {_short(polygon)}")
    return [(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon), 2)]


def polygons_to_mask(polygons: Sequence[Sequence[float]], *, height: int, width: int) -> np.ndarray:
    """Rasterise the COCO polygons of one annotation and take their union.

    Pixels on the polygon boundary are included (PIL fill + outline); boundary pixels may
    differ by one from pycocotools' ``frPoly``.

    Args:
        polygons: list of flat polygons ``[[x1, y1, x2, y2, ...], ...]`` in pixel coordinates.
        height: image height H.
        width: image width W.

    Returns:
        uint8 array of shape (H, W) with values 0 and 1.
    """
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        _draw_polygon(draw, _check_flat_polygon(polygon), 1)
    return np.asarray(canvas, dtype=np.uint8).copy()


def segmentation_to_mask(segmentation: Any, *, height: int, width: int) -> np.ndarray:
    """Decode one COCO ``segmentation`` (polygons, an RLE, or a list of RLEs) to a union mask.

    Args:
        segmentation: a list of flat polygons, an RLE dict, or a list of RLE dicts.
        height: image height H (RLE sizes must match it).
        width: image width W.

    Returns:
        uint8 array of shape (H, W) with values 0 and 1.
    """
    if isinstance(segmentation, Mapping):
        parts: list[Any] = [segmentation]
    elif isinstance(segmentation, Sequence) and not isinstance(segmentation, str):
        parts = list(segmentation)
    else:
        raise ValueError(
            f"expected a segmentation as a list of polygons or an RLE dict, got {_short(segmentation)}"
        )
    if not parts:
        raise ValueError("the segmentation is empty (no polygon and no RLE)")
    if all(isinstance(p, Mapping) for p in parts):
        mask = np.zeros((height, width), dtype=np.uint8)
        for part in parts:
            decoded = decode_rle(part)
            if decoded.shape != (height, width):
                raise ValueError(
                    f"RLE size {list(decoded.shape)} differs from the image size "
                    f"[{height}, {width}]"
                )
            mask |= decoded
        return mask
    if any(isinstance(p, Mapping) for p in parts):
        raise ValueError("a segmentation mixes polygons and RLE dicts; expected one kind")
    return polygons_to_mask(parts, height=height, width=width)


def reasonseg_mask(shapes: Sequence[Mapping[str, Any]], *, height: int, width: int) -> np.ndarray:
    """Rasterise ReasonSeg shapes exactly as LISA's ``get_mask_from_json`` does.

    Shapes labelled ``flag`` are skipped. The others are sorted by drawn area, largest first,
    and drawn (points truncated to int, fill plus 1-px outline) so that smaller shapes
    overwrite larger ones: 1 for a target, 255 (:data:`IGNORE_INDEX`) when the label contains
    ``ignore`` (case-insensitive).

    Args:
        shapes: the ``shapes`` list of a ReasonSeg JSON (``label`` and ``points`` per shape).
        height: image height H.
        width: image width W.

    Returns:
        uint8 array of shape (H, W): 0 background, 1 target, 255 ignore.
    """
    drawn: list[tuple[list[tuple[int, int]], int]] = []
    for shape in shapes:
        label = str(shape["label"]).lower()
        if label == "flag":  # LISA: "meaningless deprecated annotations"
            continue
        value = IGNORE_INDEX if "ignore" in label else 1
        drawn.append((_int_points(shape["points"]), value))
    areas = []
    for points, _ in drawn:
        single = Image.new("L", (width, height), 0)
        _draw_polygon(ImageDraw.Draw(single), points, 1)
        areas.append(int(np.count_nonzero(np.asarray(single))))
    # LISA: np.argsort(areas)[::-1]; a stable sort reproduces its order for equal areas.
    order = np.argsort(np.asarray(areas, dtype=np.int64), kind="stable")[::-1]
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for index in order:
        points, value = drawn[int(index)]
        _draw_polygon(draw, points, value)
    return np.asarray(canvas, dtype=np.uint8).copy()


def _int_points(points: Any) -> list[tuple[int, int]]:
    """Validate ReasonSeg ``points`` ``[[x, y], ...]`` and truncate them to int (as LISA)."""
    if not isinstance(points, Sequence) or isinstance(points, str) or not points:
        raise ValueError(f"'points' must be a non-empty list of [x, y], got {_short(points)}")
    out = []
    for point in points:
        if (
            not isinstance(point, Sequence)
            or len(point) != 2
            or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in point)
        ):
            raise ValueError(f"each point must be [x, y] with finite numbers, got {_short(point)}")
        out.append((int(point[0]), int(point[1])))  # np.int32 cast truncates toward zero
    return out


# ----------------------------------------------------------------------------- record


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
        """Open the image as RGB (EXIF orientation is not applied, like LISA's cv2 reads)."""
        path = Path(self.image_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"record {self.record_id!r} ({self.source} {self.split}): image {path} does not "
                "exist; pass image_dir= to the loader if the images live elsewhere"
            )
        with Image.open(path) as image:
            return image.convert("RGB")

    def to_dict(self) -> dict[str, Any]:
        """The plain fields (no masks, no image) as a dict."""
        return {
            name: getattr(self, name) for name in self.__dataclass_fields__ if name != "geometry"
        }


# ----------------------------------------------------------------------------- helpers


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: Path) -> Any:
    """Read JSON as UTF-8 (BOM allowed), retrying cp1252 like LISA does."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")
    return json.loads(text)


class _RefusingUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global, so no class or function can be loaded."""

    def __init__(self, file: io.BufferedIOBase, path: Path, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(self._path, f"{module}.{name}")


def _safe_unpickle(path: Path) -> Any:
    # Python 2 pickles (the original refs) store ``str`` as bytes; try UTF-8 then latin-1.
    for encoding in ("utf-8", "latin-1"):
        try:
            with path.open("rb") as handle:
                return _RefusingUnpickler(handle, path, encoding).load()
        except UnicodeDecodeError:
            continue
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError) as error:
            raise DatasetFormatError(
                path, None, f"is not a readable refs pickle ({type(error).__name__}: {error})"
            ) from error
    raise DatasetFormatError(path, None, "has strings that are neither UTF-8 nor latin-1")


def read_refs(path: str | Path) -> list[dict[str, Any]]:
    """Read a refer-style refs file (``.p`` pickle or ``.json``) safely.

    Pickles are read with an unpickler whose ``find_class`` refuses every global, so a file
    carrying a ``__reduce__`` payload raises :class:`UnsafePickleError` without running it.

    Returns:
        The list of ref dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refs file {path} does not exist")
    if path.suffix == ".json":
        try:
            refs = _read_json(path)
        except json.JSONDecodeError as error:
            raise DatasetFormatError(path, None, f"is not valid JSON ({error})") from error
    else:
        refs = _safe_unpickle(path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DatasetFormatError(
            path, None, f"expected a list of ref dicts, got {type(refs).__name__}"
        )
    return refs


def convert_refs_pickle_to_json(
    path: str | Path, out_path: str | Path | None = None, *, overwrite: bool = False
) -> Path:
    """Convert a ``refs(<splitBy>).p`` pickle to JSON once, with the safe unpickler.

    Args:
        path: the pickle file.
        out_path: where to write; defaults to the same name with ``.json``. The loaders prefer
            this JSON when it sits next to the pickle.
        overwrite: replace an existing output file.

    Returns:
        The path of the JSON file.
    """
    path = Path(path)
    out = Path(out_path) if out_path is not None else path.with_suffix(".json")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    refs = read_refs(path)
    out.write_text(json.dumps(refs, ensure_ascii=False), encoding="utf-8")
    logger.info("Converted %d refs from %s to %s", len(refs), path, out)
    return out


def _find_refs_file(directory: Path, stem: str) -> Path:
    """Prefer ``<stem>.json`` (safe and fast) and fall back to ``<stem>.p``."""
    for suffix in (".json", ".p"):
        candidate = directory / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"found neither {directory / (stem + '.json')} nor {directory / (stem + '.p')}; "
        "check root= (it should contain the dataset folder) and split_by="
    )


@dataclass(frozen=True)
class _Instances:
    path: Path
    images: dict[int, dict[str, Any]]
    annotations: dict[int, dict[str, Any]]


def _read_instances(path: Path) -> _Instances:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations {path} do not exist; check root=")
    try:
        data = _read_json(path)
    except json.JSONDecodeError as error:
        raise DatasetFormatError(path, None, f"is not valid JSON ({error})") from error
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DatasetFormatError(
            path, None, "expected a COCO dict with 'images' and 'annotations' lists"
        )
    images = {int(image["id"]): image for image in data["images"]}
    annotations = {int(ann["id"]): ann for ann in data["annotations"]}
    return _Instances(path, images, annotations)


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


# ----------------------------------------------------------------------------- loaders


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
                    width, height = image.size
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
