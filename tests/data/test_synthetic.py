"""Tests of the synthetic reasoning-segmentation world (modeling_segcompass/data/synthetic/).

Semantic checks re-derive each answer from the instruction text and the masks/objects, with
rules written here independently of the generator's resolver.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from modeling_segcompass.answer_format import REF_TOKEN, THINK_END, THINK_START
from modeling_segcompass.data.synthetic import (
    COLOUR_FUNCTIONS,
    FAMILIES,
    KIND_FUNCTIONS,
    MAX_COT_WORDS,
    PALETTE,
    PLURALS,
    SyntheticWorldConfig,
    _cell_name,
    as_mask_array,
    build_dataset,
    describe_example,
    draw_example,
    generate_example,
    generate_examples,
    iter_texts,
    word_vocabulary,
)

KIND_OF_PLURAL = {v: k for k, v in PLURALS.items()}


def build_tiny_cfg(**overrides) -> SyntheticWorldConfig:
    return SyntheticWorldConfig(**overrides)


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return generate_examples(build_tiny_cfg(seed=7), 420)


def by_family(examples: list[dict], family: str) -> list[dict]:
    chosen = [e for e in examples if e["family"] == family]
    assert len(chosen) >= 30, f"too few {family} examples ({len(chosen)}) to test"
    return chosen


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def description(words: list[str]) -> dict:
    """Parse "[size] [colour] kind|shape" words (independently of the generator)."""
    out = {"size": None, "colour": None, "kind": None}
    for w in words:
        if w in ("small", "large"):
            out["size"] = w
        elif w in PALETTE:
            out["colour"] = w
        elif w in PLURALS:
            out["kind"] = w
        elif w in KIND_OF_PLURAL:
            out["kind"] = KIND_OF_PLURAL[w]
    return out


def matching(objects: list[dict], desc: dict) -> list[int]:
    return [
        i
        for i, o in enumerate(objects)
        if all(desc[k] is None or o[k] == desc[k] for k in ("size", "colour", "kind"))
    ]


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_examples_and_other_seed_differs():
    first = generate_examples(build_tiny_cfg(seed=3), 25)
    second = generate_examples(build_tiny_cfg(seed=3), 25)
    for a, b in zip(first, second):
        assert a["image"].tobytes() == b["image"].tobytes()
        assert a["masks"].tobytes() == b["masks"].tobytes()
        assert (a["instruction"], a["cot"], a["response"]) == (
            b["instruction"],
            b["cot"],
            b["response"],
        )
        assert a["objects"] == b["objects"]
    other = generate_examples(build_tiny_cfg(seed=4), 25)
    assert sum(a["image"].tobytes() != b["image"].tobytes() for a, b in zip(first, other)) >= 24
    assert [a["response"] for a in first] != [b["response"] for b in other]


def test_example_depends_only_on_seed_and_index():
    cfg = build_tiny_cfg(seed=11)
    alone = generate_example(cfg, 17)
    in_run = generate_examples(cfg, 3, start=16)[1]
    assert alone["index"] == in_run["index"] == 17
    assert alone["image"].tobytes() == in_run["image"].tobytes()
    assert alone["response"] == in_run["response"]


def test_iter_texts_matches_generated_examples():
    cfg = build_tiny_cfg(seed=5)
    texts = list(iter_texts(cfg, 12))
    expected = []
    for e in generate_examples(cfg, 12):
        expected += [e["instruction"], e["response"]]
    assert texts == expected


# --------------------------------------------------------------------------- format


def test_response_has_k_ref_tokens_after_think(examples):
    for e in examples:
        response = e["response"]
        assert response.startswith(f"{THINK_START} {e['cot']} {THINK_END} ")
        assert response.count(THINK_START) == 1 and response.count(THINK_END) == 1
        tail = response.split(THINK_END, 1)[1]
        assert tail.split() == [REF_TOKEN] * 3
        assert REF_TOKEN not in response.split(THINK_END, 1)[0]
        assert len(response.split()) <= build_tiny_cfg().max_response_words


def test_answer_prefix_and_num_slots_shape_the_answer_part():
    cfg = build_tiny_cfg(num_slots=5, answer_prefix="Here are the reference positions:")
    for e in generate_examples(cfg, 20):
        tail = e["response"].split(THINK_END, 1)[1].split()
        assert tail == ["Here", "are", "the", "reference", "positions:"] + [REF_TOKEN] * 5
        assert len(e["response"].split()) <= cfg.max_response_words


def test_single_slot_world_has_no_multi_object_examples():
    cfg = build_tiny_cfg(num_slots=1)
    assert cfg.family_weights["multi_object"] == 0
    for e in generate_examples(cfg, 40):
        assert e["family"] != "multi_object" and e["num_objects"] <= 1
        assert e["response"].split(THINK_END)[1].split() == [REF_TOKEN]


def test_cot_is_short_names_the_answer_and_uses_a_closed_vocabulary(examples):
    vocabulary = set(word_vocabulary(build_tiny_cfg()))
    for e in examples:
        assert len(e["cot"].split()) <= MAX_COT_WORDS
        for text in (e["instruction"], e["response"]):
            assert set(text.split()) <= vocabulary, set(text.split()) - vocabulary
        answer = e["cot"].rsplit("answer :", 1)[1].strip()
        if e["num_objects"] == 0:
            assert answer == "none"
            continue
        named = [phrase.strip() for phrase in answer.split(",")]
        assert len(named) == e["num_objects"]
        for phrase, i in zip(named, e["target_indices"]):
            o = e["objects"][i]
            x, y = o["center"]
            assert phrase == f"{o['colour']} {o['kind']} at {_cell_name(x, y, 64)}"


def test_answer_phrases_name_exactly_one_object(examples):
    for e in examples:
        phrases = [(o["colour"], o["kind"], _cell_name(*o["center"], 64)) for o in e["objects"]]
        assert len(set(phrases)) == len(phrases)


def test_cell_names_hand_computed():
    assert _cell_name(5.0, 5.0, 64) == "top left"
    assert _cell_name(32.0, 5.0, 64) == "top"
    assert _cell_name(32.0, 32.0, 64) == "center"
    assert _cell_name(60.0, 32.0, 64) == "right"
    assert _cell_name(60.0, 60.0, 64) == "bottom right"
    assert _cell_name(20.0, 44.0, 64) == "bottom left"


def test_full_distractor_similarity_makes_every_distractor_a_near_miss():
    cfg = build_tiny_cfg(distractor_similarity=1.0, family_weights={"attribute": 1.0}, seed=6)
    for e in generate_examples(cfg, 30):
        (target,) = e["target_indices"]
        t = e["objects"][target]
        for i, o in enumerate(e["objects"]):
            if i != target:
                assert o["colour"] == t["colour"] or o["kind"] == t["kind"], (o, t)


def test_every_family_is_sampled_and_weights_select_families(examples):
    assert {e["family"] for e in examples} == set(FAMILIES)
    only = generate_examples(build_tiny_cfg(family_weights={"relation": 1.0}), 15)
    assert {e["family"] for e in only} == {"relation"}


# --------------------------------------------------------------------------- masks


def test_masks_are_the_target_object_pixels(examples):
    for e in examples:
        masks, objects = e["masks"], e["objects"]
        assert masks.dtype == np.uint8 and masks.shape == (e["num_objects"], 64, 64)
        assert set(np.unique(masks)) <= {0, 1}
        assert e["num_objects"] == len(e["target_indices"])
        pixels = np.asarray(e["image"], dtype=np.float64)
        for mask, i in zip(masks, e["target_indices"]):
            o = objects[i]
            assert mask.sum() == o["area"] > 0
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max(), ys.max()] == o["bbox"]
            assert np.allclose(centroid(mask), o["center"], atol=1e-2)
            # Under the mask the image shows the object's colour (noise averages out).
            assert np.abs(pixels[mask.astype(bool)].mean(0) - PALETTE[o["colour"]]).max() < 6
        if len(masks) > 1:
            assert masks.sum(0).max() == 1, "masks overlap although allow_overlap is off"
        # Left-to-right order of objects, targets and masks.
        xs = [o["center"][0] for o in objects]
        assert xs == sorted(xs)
        assert e["target_indices"] == sorted(e["target_indices"])


def test_large_shapes_always_cover_more_pixels_than_small_ones():
    cfg = build_tiny_cfg(kinds=("circle", "square", "triangle", "cross", "star"), seed=2)
    small, large = [], []
    for e in generate_examples(cfg, 150):
        for o in e["objects"]:
            (small if o["size"] == "small" else large).append(o["area"])
    assert small and large
    assert max(small) < min(large)


def test_overlap_mode_keeps_visible_masks_disjoint_and_mostly_visible():
    cfg = build_tiny_cfg(allow_overlap=True, seed=1, texture_noise=0.0)
    overlapping_bboxes = 0
    for e in generate_examples(cfg, 60):
        for mask, i in zip(e["masks"], e["target_indices"]):
            assert mask.sum() == e["objects"][i]["area"] > 0
        if len(e["masks"]) > 1:
            assert e["masks"].sum(0).max() == 1
        boxes = [o["bbox"] for o in e["objects"]]
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                p, q = boxes[a], boxes[b]
                overlapping_bboxes += (
                    p[0] <= q[2] and q[0] <= p[2] and p[1] <= q[3] and q[1] <= p[3]
                )
    assert overlapping_bboxes > 0


def test_without_noise_the_image_is_background_plus_flat_shapes():
    cfg = build_tiny_cfg(texture_noise=0.0, image_size=96)
    e = generate_examples(cfg, 1)[0]
    pixels = np.asarray(e["image"])
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert pixels.shape == (96, 96, 3)
    assert colours == {(60, 60, 60)} | {PALETTE[o["colour"]] for o in e["objects"]}


# --------------------------------------------------------------------------- semantics


def test_attribute_answer_is_the_only_object_matching_the_description(examples):
    for e in by_family(examples, "attribute"):
        desc = description(e["instruction"].split()[1:])
        assert matching(e["objects"], desc) == e["target_indices"]
        assert e["num_objects"] == 1


def test_relation_answer_lies_in_the_asked_direction_of_the_anchor(examples):
    pattern = re.compile(r"^the shape (left of|right of|above|below) the (\w+) (\w+)$")
    for e in by_family(examples, "relation"):
        relation, colour, kind = pattern.match(e["instruction"]).groups()
        anchors = matching(e["objects"], {"size": None, "colour": colour, "kind": kind})
        assert len(anchors) == 1, "the anchor must be unique"
        ax, ay = e["objects"][anchors[0]]["center"]
        tx, ty = centroid(e["masks"][0])
        dx, dy = tx - ax, ty - ay
        expected = {
            "left of": dx < 0 and abs(dx) > abs(dy),
            "right of": dx > 0 and abs(dx) > abs(dy),
            "above": dy < 0 and abs(dy) > abs(dx),
            "below": dy > 0 and abs(dy) > abs(dx),
        }
        assert expected[relation], (e["instruction"], dx, dy)
        # No other object is clearly in that direction.
        for i, o in enumerate(e["objects"]):
            if i in (anchors[0], e["target_indices"][0]):
                continue
            ox, oy = o["center"][0] - ax, o["center"][1] - ay
            clearly = {
                "left of": ox < 0 and abs(ox) > abs(oy),
                "right of": ox > 0 and abs(ox) > abs(oy),
                "above": oy < 0 and abs(oy) > abs(ox),
                "below": oy > 0 and abs(oy) > abs(ox),
            }
            assert not clearly[relation], e["instruction"]
        assert e["query"]["anchor_index"] == anchors[0]


def test_superlative_answer_is_the_extreme_member_of_its_group(examples):
    for e in by_family(examples, "superlative"):
        words = e["instruction"].split()
        superlative, desc = words[1], description(words[2:])
        group = matching(e["objects"], desc)
        assert len(group) >= 2
        (target,) = e["target_indices"]
        assert target in group
        mask = e["masks"][0]
        others = [e["objects"][i] for i in group if i != target]
        x, y = centroid(mask)
        for o in others:
            holds = {
                "largest": mask.sum() > o["area"],
                "smallest": mask.sum() < o["area"],
                "leftmost": x < o["center"][0],
                "rightmost": x > o["center"][0],
                "topmost": y < o["center"][1],
                "bottommost": y > o["center"][1],
            }[superlative]
            assert holds, (e["instruction"], o)


def test_negation_answer_is_the_only_object_failing_the_property(examples):
    for e in by_family(examples, "negation"):
        prop = e["instruction"].removeprefix("the only shape that is not ").split()[-1]
        key = "colour" if prop in PALETTE else "kind"
        failing = [i for i, o in enumerate(e["objects"]) if o[key] != prop]
        assert failing == e["target_indices"]
        assert len(e["objects"]) >= 2


def test_function_words_map_to_the_table_and_a_unique_object(examples):
    phrase_to_value = {v[1]: ("kind", k) for k, v in KIND_FUNCTIONS.items()}
    phrase_to_value |= {v[1]: ("colour", c) for c, v in COLOUR_FUNCTIONS.items()}
    for e in by_family(examples, "function"):
        key, value = phrase_to_value[e["instruction"]]
        having = [i for i, o in enumerate(e["objects"]) if o[key] == value]
        assert having == e["target_indices"]


def test_multi_object_masks_are_exactly_the_group(examples):
    for e in by_family(examples, "multi_object"):
        desc = description(e["instruction"].removeprefix("all the ").split())
        group = matching(e["objects"], desc)
        assert group == e["target_indices"]
        assert 2 <= e["num_objects"] <= 3
        union = e["masks"].sum(0)
        assert union.sum() == sum(e["objects"][i]["area"] for i in group)
        # The CoT states the count it found.
        count_word = ["zero", "one", "two", "three"][e["num_objects"]]
        assert f": {count_word} ." in e["cot"]


def test_no_target_examples_have_no_mask_and_no_matching_object(examples):
    for e in by_family(examples, "no_target"):
        assert e["num_objects"] == 0 and e["target_indices"] == []
        assert e["masks"].shape == (0, 64, 64)
        desc = description(e["instruction"].split()[1:])
        assert matching(e["objects"], desc) == []


# --------------------------------------------------------------------------- dataset


def test_dataset_round_trips_through_save_and_load(tmp_path):
    from datasets import load_from_disk

    cfg = build_tiny_cfg(seed=9, family_weights={"no_target": 1.0, "multi_object": 1.0})
    originals = generate_examples(cfg, 8)
    dataset = build_dataset(cfg, 8)
    dataset.save_to_disk(str(tmp_path / "world"))
    loaded = load_from_disk(str(tmp_path / "world"))
    assert len(loaded) == 8
    as_numpy = loaded.with_format("numpy")
    assert {0, 2, 3} & {int(n) for n in loaded["num_objects"]}
    for j, original in enumerate(originals):
        row = loaded[j]
        assert row["image"].convert("RGB").tobytes() == original["image"].tobytes()
        for field in ("instruction", "family", "cot", "response", "num_objects"):
            assert row[field] == original[field]
        assert row["objects"] == original["objects"]
        assert row["target_indices"] == original["target_indices"]
        masks = as_mask_array(as_numpy[j]["masks"], 64)
        assert np.array_equal(as_mask_array(row["masks"], 64), original["masks"])
        assert masks.dtype == np.uint8 and masks.shape == original["masks"].shape
        assert np.array_equal(masks, original["masks"])


# --------------------------------------------------------------------------- misc


def test_draw_example_outlines_only_target_boundaries():
    e = generate_examples(build_tiny_cfg(seed=2, family_weights={"attribute": 1.0}), 1)[0]
    drawn = np.asarray(draw_example(e, scale=2))
    base = np.asarray(e["image"]).repeat(2, 0).repeat(2, 1)
    changed = np.any(drawn != base, axis=-1)
    mask = e["masks"][0].astype(bool).repeat(2, 0).repeat(2, 1)
    assert changed.any()
    assert not (changed & ~mask).any(), "outline drawn outside the target"
    assert np.all(drawn[changed] == 255)
    # The interior (eroded by 1 px) stays untouched.
    inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    assert not changed[1:-1, 1:-1][inner].any()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"image_size": 32}, "image_size"),
        ({"min_objects": 1}, "min_objects"),
        ({"max_objects": 9}, "max_objects"),
        ({"kinds": ("circle", "hexagon", "square")}, "kinds"),
        ({"colours": ("red", "green")}, "colours"),
        ({"sizes": ("huge",)}, "sizes"),
        ({"num_slots": 0}, "num_slots"),
        ({"family_weights": {"riddles": 1.0}}, "family_weights"),
        ({"family_weights": {"attribute": 0.0}}, "positive weight"),
        ({"distractor_similarity": 1.5}, "distractor_similarity"),
    ],
)
def test_invalid_configs_are_refused_with_the_field_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        build_tiny_cfg(**overrides)


def test_single_size_world_still_builds_every_family():
    cfg = build_tiny_cfg(sizes=("large",), seed=4)
    examples = generate_examples(cfg, 60)
    assert all(o["size"] == "large" for e in examples for o in e["objects"])
    sups = [e["instruction"].split()[1] for e in examples if e["family"] == "superlative"]
    assert sups and not {"largest", "smallest"} & set(sups)


def test_as_mask_array_normalises_rows_and_refuses_wrong_sizes():
    assert as_mask_array([], 64).shape == (0, 64, 64)
    ones = as_mask_array([[[1, 0], [0, 1]]], 2)
    assert ones.dtype == np.uint8 and ones.tolist() == [[[1, 0], [0, 1]]]
    with pytest.raises(ValueError, match=r"\(N, 64, 64\)"):
        as_mask_array(np.zeros((1, 32, 32)), 64)


# --------------------------------------------------------------------------- description task


def test_description_lists_every_object_left_to_right_with_its_cell(examples):
    from modeling_segcompass.data.synthetic import DESCRIBE_INSTRUCTION

    cfg = build_tiny_cfg(seed=7)
    vocabulary = set(word_vocabulary(cfg))
    for e in examples[:60]:
        d = describe_example(e, cfg)
        assert d["instruction"] == DESCRIBE_INSTRUCTION and d["image"] is e["image"]
        assert d["num_objects"] == 0 and d["masks"].shape == (0, 64, 64)
        assert d["response"] == f"{THINK_START} {d['cot']} {THINK_END} " + " ".join([REF_TOKEN] * 3)
        assert set(d["response"].split()) | set(d["instruction"].split()) <= vocabulary
        items = d["cot"].split(" , ")
        assert len(items) == len(e["objects"])
        xs = [o["center"][0] for o in e["objects"]]
        assert xs == sorted(xs)  # left to right
        for item, obj in zip(items, e["objects"], strict=True):
            size, colour, kind, at, *cell = item.split()
            assert (size, colour, kind, at) == (obj["size"], obj["colour"], obj["kind"], "at")
            x, y = obj["center"]
            row = ("top", "middle", "bottom")[min(int(3 * y / 64), 2)]
            col = ("left", "center", "right")[min(int(3 * x / 64), 2)]
            expected = [w for w in (row, col) if w not in ("middle", "center")] or ["center"]
            assert cell == expected, (item, obj)


def test_iter_texts_with_descriptions_matches_describe_example():
    from modeling_segcompass.data.synthetic import describe_example

    cfg = build_tiny_cfg(seed=5)
    texts = list(iter_texts(cfg, 8, descriptions=True))
    expected = []
    for e in generate_examples(cfg, 8):
        d = describe_example(e, cfg)
        expected += [e["instruction"], e["response"], d["instruction"], d["response"]]
    assert texts == expected


def test_balanced_examples_takes_the_first_of_each_weighted_family_in_order():
    from modeling_segcompass.data.synthetic import balanced_examples

    cfg = build_tiny_cfg(
        seed=3, family_weights={"attribute": 5.0, "relation": 1.0, "negation": 1.0}
    )
    chosen = balanced_examples(cfg, 6)
    # independently: scan a pool far larger than needed, keep the first 6 of each family
    expected, counts = [], {}
    for e in generate_examples(cfg, 400):
        if counts.get(e["family"], 0) < 6:
            counts[e["family"]] = counts.get(e["family"], 0) + 1
            expected.append(e["index"])
    assert [e["index"] for e in chosen] == expected
    assert sorted(counts) == ["attribute", "negation", "relation"] and set(counts.values()) == {6}
    with pytest.raises(ValueError, match="per_family must be >= 1"):
        balanced_examples(cfg, 0)


def test_scene_first_style_prefixes_the_description_and_keeps_the_same_examples():
    focused = generate_examples(build_tiny_cfg(seed=11), 140)
    cfg = build_tiny_cfg(seed=11, cot_style="scene_first")
    scene_first = generate_examples(cfg, 140)
    vocabulary = set(word_vocabulary(cfg))
    for a, b in zip(focused, scene_first, strict=True):
        # the same scene, instruction and masks: only the chain of thought differs
        assert (a["instruction"], a["family"], a["objects"]) == (
            b["instruction"],
            b["family"],
            b["objects"],
        )
        assert np.array_equal(a["masks"], b["masks"])
        scene = describe_example(b, cfg)["cot"]
        assert b["cot"].startswith(f"scene : {scene} . ")
        rest = b["cot"][len(f"scene : {scene} . ") :]
        # the same answer; negation no longer repeats the listing of every shape
        assert rest.rsplit("answer :", 1)[1] == a["cot"].rsplit("answer :", 1)[1]
        if b["family"] == "negation":
            assert a["cot"].startswith("shapes : ") and a["cot"].endswith(rest)
        else:
            assert rest == a["cot"]
        assert len(b["cot"].split()) <= cfg.max_cot_words
        assert len(b["response"].split()) <= cfg.max_response_words
        assert set(b["response"].split()) <= vocabulary
    assert cfg.max_cot_words > build_tiny_cfg().max_cot_words == MAX_COT_WORDS
    with pytest.raises(ValueError, match="cot_style"):
        build_tiny_cfg(cot_style="scene")


def test_answer_tokens_are_those_of_answer_format():
    from modeling_segcompass import answer_format
    from modeling_segcompass.data import synthetic

    assert synthetic.REF_TOKEN is answer_format.REF_TOKEN
    assert synthetic.THINK_START is answer_format.THINK_START
    assert synthetic.THINK_END is answer_format.THINK_END


def test_scene_marked_style_decides_each_object_in_the_scene():
    """ "scene_marked": the families decided object by object list the scene with "is" after
    each target and "not" after every other object, then the same answer; relation and
    superlative keep the scene_first reasoning. Same scenes, words within the vocabulary."""
    from modeling_segcompass.data.synthetic import MARKED_FAMILIES

    first = generate_examples(build_tiny_cfg(seed=11, cot_style="scene_first"), 140)
    cfg = build_tiny_cfg(seed=11, cot_style="scene_marked")
    marked = generate_examples(cfg, 140)
    vocabulary = set(word_vocabulary(cfg))
    seen = set()
    for a, b in zip(first, marked, strict=True):
        assert (a["instruction"], a["objects"]) == (b["instruction"], b["objects"])
        assert a["cot"].rsplit("answer :", 1)[1] == b["cot"].rsplit("answer :", 1)[1]
        assert len(b["cot"].split()) <= cfg.max_cot_words
        assert set(b["response"].split()) <= vocabulary
        if b["family"] not in MARKED_FAMILIES:
            assert b["cot"] == a["cot"]
            continue
        seen.add(b["family"])
        scene = b["cot"].split("scene : ", 1)[1].split(" . answer :", 1)[0]
        items = scene.split(" , ")
        assert len(items) == len(b["objects"])
        answer = b["cot"].rsplit("answer : ", 1)[1]
        named = [] if answer == "none" else answer.split(" , ")
        chosen = [
            " ".join(item.split()[1:3] + ["at"] + item.split()[4:-1])
            for item in items
            if item.endswith(" is")
        ]
        assert sorted(chosen) == sorted(named) and len(named) == b["num_objects"]
        assert all(item.endswith((" is", " not")) for item in items)
        assert b["cot"].startswith("scene : ") != (b["family"] == "function")
    assert seen == set(MARKED_FAMILIES)
    assert cfg.max_cot_words > build_tiny_cfg(cot_style="scene_first").max_cot_words
