"""Tests for modeling_segcompass.data.formats: tiny fixtures in the real on-disk formats."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_segcompass.data.formats import (
    IGNORE_INDEX,
    DatasetFormatError,
    SegmentationRecord,
    UnsafePickleError,
    convert_refs_pickle_to_json,
    decode_rle,
    encode_rle,
    load_grefcoco,
    load_reasonseg,
    load_refcoco,
    polygons_to_mask,
    read_refs,
    reasonseg_mask,
    segmentation_to_mask,
    to_hf_dataset,
)

# ----------------------------------------------------------------------------- fixtures helpers


def _save_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (120, 30, 200)).save(path)


def _box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Inclusive pixel box [x0..x1] x [y0..y1] on a 6x8 canvas (H=6, W=8)."""
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[y0 : y1 + 1, x0 : x1 + 1] = 1
    return mask


# The 3x3 mask of the hand-made RLE "151L0": runs [1, 5, 1, 1, 1] in column-major order,
# i.e. columns (0,1,1), (1,1,1), (0,1,0).
RLE_3X3 = "151L0"
MASK_3X3 = np.array([[0, 1, 0], [1, 1, 1], [1, 1, 0]], dtype=np.uint8)


def _write_reasonseg(root: Path) -> Path:
    split_dir = root / "reason_seg" / "ReasonSeg" / "val"
    _save_image(split_dir / "cat.jpg", 10, 8)
    shapes = [
        # Listed first but smaller: it must overwrite the big target, not be overwritten.
        {"label": "ignore", "points": [[3, 2], [5, 2], [5, 4], [3, 4]], "group_id": None},
        {
            "label": "target",
            "points": [[1, 1], [8.9, 1], [8.9, 6], [1, 6]],
            "shape_type": "polygon",
        },
        # Smallest of all (one pixel): drawn last, a target pixel inside the ignore region.
        {"label": "target", "points": [[4, 3]]},
        # "flag" shapes are skipped; drawn, this one would cover the whole image.
        {"label": "flag", "points": [[0, 0], [9, 0], [9, 7], [0, 7]]},
    ]
    anno = {"text": ["the cat", "what is sleeping?"], "is_sentence": True, "shapes": shapes}
    (split_dir / "cat.json").write_text(json.dumps(anno))
    _save_image(split_dir / "dog.jpg", 4, 3)
    # cp1252 bytes (not UTF-8): LISA retries with cp1252.
    dog = {"text": ["caf\u00e9 dog"], "is_sentence": False, "shapes": []}
    (split_dir / "dog.json").write_bytes(json.dumps(dog, ensure_ascii=False).encode("cp1252"))
    return split_dir


def _instances(images, annotations) -> dict:
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cat"}]}


def _sentence(sent_id: int, raw: str) -> dict:
    return {"sent": raw.lower(), "raw": raw, "tokens": raw.lower().split(), "sent_id": sent_id}


def _refcoco_files(root: Path) -> tuple[list[dict], dict]:
    images = [
        {"id": 101, "file_name": "COCO_train2014_000000000101.jpg", "height": 6, "width": 8},
        {"id": 102, "file_name": "COCO_train2014_000000000102.jpg", "height": 3, "width": 3},
    ]
    annotations = [
        {  # two polygon parts: the mask is their union
            "id": 1,
            "image_id": 101,
            "category_id": 1,
            "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3], [5, 4, 6, 4, 6, 5, 5, 5]],
            "area": 13,
            "bbox": [1, 1, 5, 4],
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 102,
            "category_id": 1,
            "segmentation": {"size": [3, 3], "counts": RLE_3X3},
            "area": 6,
            "bbox": [0, 0, 3, 3],
            "iscrowd": 0,
        },
        {  # uncompressed RLE: runs [1, 2, 3, 3] -> column 0 = (0,1,1), column 1 = (0,0,0)...
            "id": 3,
            "image_id": 102,
            "category_id": 1,
            "segmentation": {"size": [3, 3], "counts": [1, 2, 3, 3]},
            "area": 5,
            "bbox": [0, 1, 3, 2],
            "iscrowd": 1,
        },
    ]
    refs = [
        {
            "ref_id": 10,
            "ann_id": 1,
            "image_id": 101,
            "category_id": 1,
            "split": "val",
            "file_name": "COCO_train2014_000000000101_3.jpg",  # the refer "_<n>" suffix
            "sent_ids": [100, 101],
            "sentences": [_sentence(100, "Left Cat"), _sentence(101, "The cat on the left")],
        },
        {
            "ref_id": 11,
            "ann_id": 2,
            "image_id": 102,
            "category_id": 1,
            "split": "val",
            "file_name": "COCO_train2014_000000000102_1.jpg",
            "sent_ids": [110],
            "sentences": [_sentence(110, "Blob")],
        },
        {
            "ref_id": 12,
            "ann_id": 1,
            "image_id": 101,
            "category_id": 1,
            "split": "train",
            "file_name": "COCO_train2014_000000000101_3.jpg",
            "sent_ids": [120],
            "sentences": [_sentence(120, "Cat")],
        },
        {
            "ref_id": 13,
            "ann_id": 3,
            "image_id": 102,
            "category_id": 1,
            "split": "val",
            "file_name": "COCO_train2014_000000000102_1.jpg",
            "sent_ids": [130],
            "sentences": [_sentence(130, "Crowd")],
        },
    ]
    return refs, _instances(images, annotations)


def _write_refcoco(root: Path, refs=None, instances=None, *, as_json: bool = False) -> Path:
    default_refs, default_instances = _refcoco_files(root)
    refs = default_refs if refs is None else refs
    instances = default_instances if instances is None else instances
    folder = root / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    if as_json:
        path = folder / "refs(unc).json"
        path.write_text(json.dumps(refs))
    else:
        path = folder / "refs(unc).p"
        with path.open("wb") as handle:
            pickle.dump(refs, handle, protocol=2)  # the original files are Python 2 pickles
    return path


def _write_grefcoco(root: Path) -> Path:
    images = [{"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": 6, "width": 8}]
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 2, 2],
         "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
        {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [4, 3, 3, 2],
         "segmentation": [[4, 3, 7, 3, 7, 5, 4, 5]]},
        {"id": 4, "image_id": 7, "category_id": 1, "iscrowd": 1, "bbox": [0, 5, 8, 1],
         "segmentation": {"size": [6, 8], "counts": [5] + [1, 5] * 7 + [1]}},
    ]  # fmt: skip

    def ref(ref_id, ann_id, split="val", n_sent=1):
        sents = [_sentence(ref_id * 10 + i, f"expr {ref_id} {i}") for i in range(n_sent)]
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": 7, "split": split,
                "category_id": [1] * len(ann_id) if isinstance(ann_id, list) else 1,
                "file_name": "COCO_train2014_000000000007_0.jpg",
                "sent_ids": [s["sent_id"] for s in sents], "sentences": sents}  # fmt: skip

    refs = [
        ref(20, [1, 2], n_sent=2),
        ref(21, [-1]),
        ref(22, []),
        ref(23, 1),
        ref(24, [2, 4]),
        ref(25, [1], split="testA"),
    ]
    folder = root / "grefcoco"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps(_instances(images, annotations)))
    (folder / "grefs(unc).json").write_text(json.dumps(refs))
    return folder


# ----------------------------------------------------------------------------- RLE


def test_decode_compressed_rle_matches_hand_computed_mask():
    np.testing.assert_array_equal(decode_rle({"size": [3, 3], "counts": RLE_3X3}), MASK_3X3)
    # bytes counts (as pycocotools returns them) decode the same way
    np.testing.assert_array_equal(decode_rle({"size": [3, 3], "counts": b"151L0"}), MASK_3X3)


def test_decode_compressed_rle_multi_character_counts():
    # 40 -> "X1" (two 5-bit groups) and 16 -> "`0" (bit 0x10 needs a sign group).
    mask = decode_rle({"size": [8, 7], "counts": "X1`0"})
    expected = np.zeros(56, dtype=np.uint8)
    expected[40:] = 1
    np.testing.assert_array_equal(mask, expected.reshape((8, 7), order="F"))
    assert mask[:, 5:].all() and mask[:, :5].sum() == 0  # columns 5 and 6 are set


def test_decode_uncompressed_rle_is_column_major():
    mask = decode_rle({"size": [2, 3], "counts": [1, 2, 3]})
    # flat column-major: 0 | 1 1 | 0 0 0 -> column 0 = (0, 1), column 1 = (1, 0), column 2 = 0
    np.testing.assert_array_equal(mask, np.array([[0, 1, 0], [1, 0, 0]], dtype=np.uint8))


def test_encode_rle_reproduces_hand_made_string():
    assert encode_rle(MASK_3X3) == {"size": [3, 3], "counts": RLE_3X3}
    full = np.ones((2, 2), dtype=np.uint8)
    assert decode_rle(encode_rle(full)).all()  # leading empty zero run


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_rle_round_trip(height, width, seed):
    mask = (np.random.default_rng(seed).random((height, width)) < 0.4).astype(np.uint8)
    encoded = encode_rle(mask)
    assert isinstance(encoded["counts"], str)
    np.testing.assert_array_equal(decode_rle(encoded), mask)


def test_decode_rle_rejects_counts_of_the_wrong_size():
    with pytest.raises(ValueError, match="cover 9 pixels but size 2x2"):
        decode_rle({"size": [2, 2], "counts": RLE_3X3})
    with pytest.raises(ValueError, match="'size' and 'counts'"):
        decode_rle({"counts": "1"})


# ----------------------------------------------------------------------------- polygons


def test_polygons_union_fills_boundary_pixels():
    mask = polygons_to_mask([[1, 1, 3, 1, 3, 3, 1, 3], [5, 4, 6, 4, 6, 5, 5, 5]], height=6, width=8)
    np.testing.assert_array_equal(mask, _box(1, 1, 3, 3) | _box(5, 4, 6, 5))


def test_polygon_with_odd_coordinates_is_refused():
    with pytest.raises(ValueError, match="odd number of coordinates"):
        polygons_to_mask([[1, 1, 3, 1, 3]], height=4, width=4)


def test_segmentation_list_of_rles_is_a_union():
    left = {"size": [3, 3], "counts": [0, 3, 6]}  # column 0
    right = {"size": [3, 3], "counts": [6, 3]}  # column 2
    mask = segmentation_to_mask([left, right], height=3, width=3)
    np.testing.assert_array_equal(mask, np.array([[1, 0, 1]] * 3, dtype=np.uint8))


def test_reasonseg_mask_order_ignore_and_flag():
    shapes = [
        {"label": "Ignore", "points": [[1, 1], [2, 1], [2, 2], [1, 2]]},
        {"label": "target", "points": [[0, 0], [4, 0], [4, 3], [0, 3]]},
        {"label": "flag", "points": [[0, 0], [4, 0], [4, 3], [0, 3]]},
    ]
    mask = reasonseg_mask(shapes, height=4, width=5)
    expected = np.ones((4, 5), dtype=np.uint8)
    expected[1:3, 1:3] = IGNORE_INDEX  # smaller ignore overwrites the larger target
    np.testing.assert_array_equal(mask, expected)


# ----------------------------------------------------------------------------- ReasonSeg


def test_load_reasonseg_mask_values_and_fields(tmp_path):
    _write_reasonseg(tmp_path)
    records = load_reasonseg(tmp_path, "val")
    assert [r.record_id for r in records] == ["cat", "dog"]
    cat = records[0]
    assert cat.text == "the cat" and cat.texts == ["the cat", "what is sleeping?"]
    assert cat.is_sentence is True and cat.source == "reasonseg" and cat.split == "val"
    assert (cat.height, cat.width, cat.num_objects) == (8, 10, 1)
    masks = cat.masks
    assert masks.dtype == np.uint8 and masks.shape == (1, 8, 10)
    expected = np.zeros((8, 10), dtype=np.uint8)
    expected[1:7, 1:9] = 1  # 8.9 is truncated to 8 as LISA's int32 cast does
    expected[2:5, 3:6] = IGNORE_INDEX
    expected[3, 4] = 1
    np.testing.assert_array_equal(masks[0], expected)
    assert cat.bboxes == [[1.0, 1.0, 7.0, 5.0]]  # target vertices only, ignore excluded
    assert cat.load_image().size == (10, 8)
    dog = records[1]
    assert dog.text == "caf\u00e9 dog" and dog.is_sentence is False  # read as cp1252
    assert dog.masks.sum() == 0 and dog.bboxes == []


def test_load_reasonseg_per_sentence_expansion(tmp_path):
    _write_reasonseg(tmp_path)
    records = load_reasonseg(tmp_path / "reason_seg" / "ReasonSeg", "val", per_sentence=True)
    assert [(r.record_id, r.text) for r in records] == [
        ("cat:0", "the cat"),
        ("cat:1", "what is sleeping?"),
        ("dog:0", "caf\u00e9 dog"),
    ]
    np.testing.assert_array_equal(records[0].masks, records[1].masks)


def test_reasonseg_missing_shapes_names_file_and_id_and_skip_counts(tmp_path):
    split_dir = _write_reasonseg(tmp_path)
    _save_image(split_dir / "bad.jpg", 4, 4)
    (split_dir / "bad.json").write_text(json.dumps({"text": ["x"], "is_sentence": False}))
    with pytest.raises(DatasetFormatError) as info:
        load_reasonseg(tmp_path, "val")
    message = str(info.value)
    assert "bad.json" in message and "'bad'" in message and "'shapes'" in message
    assert info.value.record_id == "bad"

    records = load_reasonseg(tmp_path, "val", on_error="skip")
    assert [r.record_id for r in records] == ["cat", "dog"]
    assert records.num_skipped == 1 and records.skipped[0].record_id == "bad"


def test_reasonseg_bad_arguments(tmp_path):
    _write_reasonseg(tmp_path)
    with pytest.raises(FileNotFoundError, match="looked in"):
        load_reasonseg(tmp_path, "test")
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        load_reasonseg(tmp_path, "val", on_error="ignore")


# ----------------------------------------------------------------------------- RefCOCO


def test_load_refcoco_from_pickle(tmp_path):
    _write_refcoco(tmp_path)
    records = load_refcoco(tmp_path, "refcoco", split="val")
    assert [r.record_id for r in records] == ["10:100", "10:101", "11:110", "13:130"]
    first, second, blob, crowd = records
    assert first.text == "Left Cat" and second.text == "The cat on the left"
    assert first.texts == ["Left Cat", "The cat on the left"] and first.sent_ids == [100, 101]
    assert (first.ref_id, first.sent_id, first.image_id) == (10, 100, 101)
    assert first.ann_ids == [1] and first.bboxes == [[1.0, 1.0, 5.0, 4.0]]
    assert first.num_objects == 1 and first.is_sentence is None
    # the file name comes from instances.images, not the ref's "_3" name
    assert first.image_path == str(
        tmp_path / "images/mscoco/images/train2014/COCO_train2014_000000000101.jpg"
    )
    np.testing.assert_array_equal(first.masks, (_box(1, 1, 3, 3) | _box(5, 4, 6, 5))[None])
    np.testing.assert_array_equal(blob.masks, MASK_3X3[None])
    expected_crowd = np.array([[0, 0, 1], [1, 0, 1], [1, 0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(crowd.masks, expected_crowd[None])


def test_load_refcoco_options(tmp_path):
    _write_refcoco(tmp_path)
    sent = load_refcoco(tmp_path, "refcoco", split="val", text_field="sent")
    assert sent[0].text == "left cat"
    per_ref = load_refcoco(tmp_path, "refcoco", split="val", per_sentence=False)
    assert [r.record_id for r in per_ref] == ["10", "11", "13"]
    assert per_ref[0].text == "Left Cat" and per_ref[0].sent_id is None
    train = load_refcoco(tmp_path, split="train", image_dir=tmp_path / "imgs")
    assert [r.ref_id for r in train] == [12]
    assert train[0].image_path == str(tmp_path / "imgs" / "COCO_train2014_000000000101.jpg")
    assert len(load_refcoco(tmp_path, split=None)) == 5
    with pytest.raises(ValueError, match=r"has the splits \['train', 'val'\]"):
        load_refcoco(tmp_path, split="testA")
    with pytest.raises(ValueError, match="split_by 'unc' does not exist for refcocog"):
        load_refcoco(tmp_path, "refcocog", split_by="unc")
    with pytest.raises(FileNotFoundError, match=r"refs\(google\)"):
        load_refcoco(tmp_path, "refcoco", split_by="google")


def test_refs_json_and_converter_give_the_same_records(tmp_path):
    pickle_path = _write_refcoco(tmp_path)
    from_pickle = load_refcoco(tmp_path, split="val")
    json_path = convert_refs_pickle_to_json(pickle_path)
    assert json_path.name == "refs(unc).json"
    assert read_refs(json_path) == read_refs(pickle_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_refs_pickle_to_json(pickle_path)
    pickle_path.unlink()  # the loader now has only the JSON
    from_json = load_refcoco(tmp_path, split="val")
    assert [r.to_dict() for r in from_json] == [r.to_dict() for r in from_pickle]
    for a, b in zip(from_json, from_pickle):
        np.testing.assert_array_equal(a.masks, b.masks)


class _Payload:
    """Pickles as a call to ``open(marker, "w")``: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    refs, _ = _refcoco_files(tmp_path)
    # The payload is real: a plain pickle.load runs it and creates the file.
    probe = tmp_path / "probe_created"
    pickle.load(io.BytesIO(pickle.dumps([_Payload(probe)])))
    assert probe.exists()

    marker = tmp_path / "pwned"
    refs[0]["sentences"][0]["raw"] = _Payload(marker)
    path = _write_refcoco(tmp_path, refs=[refs[0]])
    with pytest.raises(UnsafePickleError) as info:
        load_refcoco(tmp_path, split="val")
    message = str(info.value)
    assert str(path) in message and "refused to load the global" in message
    assert "open" in info.value.global_name
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        convert_refs_pickle_to_json(path)
    assert not marker.exists() and not path.with_suffix(".json").exists()


def test_malformed_polygon_names_file_and_ref(tmp_path):
    refs, instances = _refcoco_files(tmp_path)
    instances["annotations"][1]["segmentation"] = [[0, 0, 2, 0, 2]]
    _write_refcoco(tmp_path, refs=refs, instances=instances)
    with pytest.raises(DatasetFormatError) as info:
        load_refcoco(tmp_path, split="val")
    message = str(info.value)
    assert "instances.json" in message and "record '11'" in message
    assert "odd number of coordinates (5)" in message


def test_instances_without_ids_is_a_format_error_naming_the_file(tmp_path):
    refs, instances = _refcoco_files(tmp_path)
    del instances["images"][0]["id"]
    _write_refcoco(tmp_path, refs=refs, instances=instances)
    with pytest.raises(DatasetFormatError, match=r"instances\.json: expected 'images'"):
        load_refcoco(tmp_path, split="val")


def test_unknown_ann_id_error_and_skip_mode(tmp_path):
    refs, instances = _refcoco_files(tmp_path)
    refs[1]["ann_id"] = 999
    refs[3]["sentences"] = []
    _write_refcoco(tmp_path, refs=refs, instances=instances, as_json=True)
    with pytest.raises(
        DatasetFormatError, match=r"record '11': ann_id 999 \(from refs\(unc\)\.json\)"
    ):
        load_refcoco(tmp_path, split="val")
    records = load_refcoco(tmp_path, split="val", on_error="skip")
    assert [r.record_id for r in records] == ["10:100", "10:101"]
    assert records.num_skipped == 2
    assert [s.record_id for s in records.skipped] == ["11", "13"]
    assert "refs(unc).json" in records.skipped[1].path and "sentences" in records.skipped[1].reason


# ----------------------------------------------------------------------------- gRefCOCO


def test_grefcoco_multi_and_no_target(tmp_path):
    _write_grefcoco(tmp_path)
    records = {r.record_id: r for r in load_grefcoco(tmp_path, "val", per_sentence=False)}
    assert sorted(records) == ["20", "21", "22", "23", "24"]  # 25 is testA
    multi = records["20"]
    assert multi.num_objects == 2 and multi.ann_ids == [1, 2]
    assert multi.texts == ["expr 20 0", "expr 20 1"] and multi.text == "expr 20 0"
    np.testing.assert_array_equal(multi.masks, np.stack([_box(0, 0, 2, 2), _box(4, 3, 7, 5)]))
    assert multi.bboxes == [[0.0, 0.0, 2.0, 2.0], [4.0, 3.0, 3.0, 2.0]]
    for key in ("21", "22"):  # [-1] and [] are both no-target
        assert records[key].num_objects == 0 and records[key].ann_ids == []
        assert records[key].bboxes == [] and records[key].masks.shape == (0, 6, 8)
    assert records["23"].ann_ids == [1] and records["23"].num_objects == 1  # scalar ann_id
    crowd_row = np.zeros((6, 8), dtype=np.uint8)
    crowd_row[5, :] = 1  # runs "5 then (1 set, 5 clear)..." = the bottom row, column-major
    np.testing.assert_array_equal(records["24"].masks[1], crowd_row)


def test_grefcoco_union_mode_and_sentences(tmp_path):
    _write_grefcoco(tmp_path)
    records = {r.record_id: r for r in load_grefcoco(tmp_path, "val", union_targets=True)}
    assert "20:200" in records and "20:201" in records  # one record per sentence
    union = records["20:200"]
    assert union.num_objects == 1 and union.ann_ids == [1, 2]
    np.testing.assert_array_equal(union.masks, (_box(0, 0, 2, 2) | _box(4, 3, 7, 5))[None])
    assert union.bboxes == [[0.0, 0.0, 7.0, 5.0]]
    # ReLA skips crowd annotations in the union
    np.testing.assert_array_equal(records["24:240"].masks, _box(4, 3, 7, 5)[None])
    assert records["21:210"].num_objects == 0 and records["21:210"].masks.shape[0] == 0


def test_grefcoco_rejects_bad_split_and_mixed_no_target(tmp_path):
    folder = _write_grefcoco(tmp_path)
    with pytest.raises(ValueError, match=r"one of \['train', 'val', 'testA', 'testB'\]"):
        load_grefcoco(tmp_path, "test")
    refs = json.loads((folder / "grefs(unc).json").read_text())
    refs[1]["ann_id"] = [-1, 2]
    (folder / "grefs(unc).json").write_text(json.dumps(refs))
    with pytest.raises(DatasetFormatError, match=r"record '21'.*mixes -1"):
        load_grefcoco(tmp_path, "val")
    assert load_grefcoco(tmp_path, "val", on_error="skip").num_skipped == 1


# ----------------------------------------------------------------------------- HF datasets


def test_to_hf_dataset_round_trip(tmp_path):
    _write_reasonseg(tmp_path)
    _write_grefcoco(tmp_path)
    _save_image(tmp_path / "images/mscoco/images/train2014/COCO_train2014_000000000007.jpg", 8, 6)
    records: list[SegmentationRecord] = [
        *load_reasonseg(tmp_path, "val"),
        *load_grefcoco(tmp_path, "val", per_sentence=False),
    ]
    table = to_hf_dataset(records)
    assert len(table) == len(records)
    cat = table[0]
    assert cat["record_id"] == "cat" and cat["ref_id"] == -1 and cat["is_sentence"] is True
    np.testing.assert_array_equal(np.stack([np.asarray(m) for m in cat["masks"]]), records[0].masks)
    assert cat["image"].size == (10, 8)  # decoded lazily from image_path
    no_target = next(row for row in table if row["record_id"] == "21")
    assert no_target["masks"] == [] and no_target["num_objects"] == 0
    multi = next(row for row in table if row["record_id"] == "20")
    assert multi["ann_ids"] == [1, 2] and len(multi["masks"]) == 2
    assert "masks" not in to_hf_dataset(records[:1], include_masks=False).column_names


def test_reasonseg_images_with_an_exif_orientation_are_read_upright(tmp_path):
    """A phone photo stores its pixels sideways and an orientation tag; viewers, OpenCV and
    LabelMe show it turned, so the polygons live in the turned frame."""
    split_dir = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    split_dir.mkdir(parents=True)
    stored = Image.new("RGB", (6, 10), (200, 10, 10))  # 6 wide, 10 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": shown 10 wide, 6 high
    stored.save(split_dir / "phone.jpg", exif=exif.tobytes())
    shape = {"label": "target", "points": [[1, 1], [8, 1], [8, 4], [1, 4]]}
    anno = {"text": ["the phone"], "is_sentence": False, "shapes": [shape]}
    (split_dir / "phone.json").write_text(json.dumps(anno))
    [record] = load_reasonseg(tmp_path, "val")
    assert (record.height, record.width) == (6, 10)
    assert record.masks.shape == (1, 6, 10) and record.masks[0, 1:5, 1:9].all()
    assert record.load_image().size == (10, 6)
