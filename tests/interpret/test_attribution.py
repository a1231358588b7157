"""interpret/attribution.py and interpret/faithfulness.py: attribution of a slot's mask to its
concepts, deletion curves and purity, on the known-concept world (`known_world`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_segcompass.data.synthetic import SyntheticWorldConfig, balanced_examples
from modeling_segcompass.interpret.attribution import (
    _freeze,
    attribute_pairs,
    decode_from_codes,
    deletion_curves,
    measured_slots,
    occlusion_effects,
)
from modeling_segcompass.interpret.faithfulness import concept_matches, synthetic_target_words
from modeling_segcompass.interpret.labels import (
    ConceptWords,
    build_concept_labels,
    concepts_in_words,
    synthetic_vocabulary,
)
from modeling_segcompass.interpret.trace import _forward
from tests.helpers import build_tiny_model, make_batch
from tests.interpret.known_world import LEFT, RIGHT, scene


@pytest.fixture(scope="module")
def held_out(mask_world):
    model, batch = mask_world
    inputs = batch([scene(np.random.default_rng(s)) for s in range(200, 208)])
    return inputs, _forward(model, inputs, targets=True)


def test_decoding_from_the_frozen_codes_is_the_forward(mask_world, held_out):
    model, _ = mask_world
    inputs, output = held_out
    frozen = _freeze(model, inputs, output)
    with torch.no_grad():
        logits = decode_from_codes(model, frozen, torch.arange(8), frozen.values)
    torch.testing.assert_close(logits, output.mask_logits, atol=1e-5, rtol=1e-5)


def test_the_causal_attribution_ranks_the_planted_concept_first(mask_world, held_out):
    model, _ = mask_world
    inputs, output = held_out
    slots = measured_slots(model, inputs, output)
    assert len(slots) == 8  # every image's slot holds a mask matched to its square
    effects = occlusion_effects(model, inputs, output, slots=slots)
    firsts = []
    for p, (b, _) in enumerate(slots):
        planted = RIGHT if bool((output.concept_indices[b] == RIGHT).any()) else LEFT
        firsts.append(effects.ranking(p, 1) == [planted])
        if planted == RIGHT:  # removing "right" sends the mask to the other square
            assert effects.ranking(p, 1) == [RIGHT], (b, effects.concepts[p].topk(3))
    assert sum(firsts) >= 6, firsts
    # per-pair shares add up to the concept's effect
    torch.testing.assert_close(effects.pairs.flatten(1).sum(1), effects.concepts.sum(1))


def test_the_explained_deletion_curve_falls_faster_than_random(mask_world, held_out):
    model, _ = mask_world
    inputs, output = held_out
    effects = occlusion_effects(model, inputs, output)
    curves = deletion_curves(
        model, inputs, output, attribution=effects, max_k=4, random_draws=3,
        orders=("attribution", "greedy", "weight"),
    )  # fmt: skip
    assert curves.random.shape == (8, 3, 4) and curves.orders["attribution"].shape == (8, 4)
    assert curves.area("attribution") > 0.3
    for order in ("attribution", "greedy", "weight"):
        assert curves.area(order) > 5 * curves.area("random"), order
    # this world's mask is a step function of the planted concept (hand-set gains): gradients
    # taken at the actual codes see little of the step, so the removal-based order leads
    assert curves.area("attribution") >= curves.area("greedy")
    # the curve never starts above the unedited mask and stays a valid IoU
    assert ((curves.orders["attribution"] >= 0) & (curves.orders["attribution"] <= 1)).all()
    summary = curves.to_dict()
    assert summary["change_at_8"]["attribution"] == pytest.approx(curves.change_at(4))


def test_integrated_gradients_add_up_on_a_smooth_model():
    model = build_tiny_model()
    inputs = make_batch(model.config, [3, 2])
    output = _forward(model, inputs)
    slots = [(0, 0), (1, 1)]
    result = attribute_pairs(model, inputs, output, slots=slots, steps=64)
    assert result.pairs.shape[:1] == (2,) and result.concepts.shape == (2, model.config.d_sae)
    assert (result.completeness_gap < 0.05).all(), result.completeness_gap
    # only active (token, concept) pairs get a share
    inactive = output.concept_values[[0, 1]] == 0
    assert result.pairs[inactive].abs().max() == 0
    with pytest.raises(ValueError, match="steps"):
        attribute_pairs(model, inputs, output, slots=slots, steps=0)


def test_concept_labels_in_words_name_the_planted_concepts(world):
    model, _, tokenizer, batch, _ = world
    rng = np.random.default_rng(10)
    batches = [batch([scene(rng, t % 2) for t in range(4)]) for _ in range(2)]
    labels = build_concept_labels(model, batches, tokenizer, top_k=3)
    words = concepts_in_words(labels, {"position": ["left", "right"], "kind": ["square"]})
    assert (words[LEFT].attribute, words[LEFT].family) == ("left", "position")
    assert (words[RIGHT].attribute, words[RIGHT].family) == ("right", "position")
    assert words[LEFT].share == pytest.approx(1.0)
    assert 'position "left"' in words[LEFT].describe()
    assert concept_matches(words[LEFT], {"left", "square"})
    assert not concept_matches(words[RIGHT], {"left", "square"})
    unnamed = [w for w in words.values() if w.attribute is None]
    assert unnamed and not concept_matches(unnamed[0], {"left"})


def test_target_words_of_a_synthetic_row_and_visual_concepts():
    row = next(
        r for r in balanced_examples(SyntheticWorldConfig(seed=1), 1) if r["family"] == "attribute"
    )
    target = synthetic_target_words(row, 0)
    obj = row["objects"][row["target_indices"][0]]
    assert {obj["colour"], obj["kind"], obj["size"]} <= target
    assert target - {obj["colour"], obj["kind"], obj["size"]} <= {
        "top", "bottom", "left", "right", "center",
    }  # fmt: skip
    vocabulary = synthetic_vocabulary()
    assert obj["colour"] in vocabulary["colour"] and obj["kind"] in vocabulary["kind"]
    position = sorted(target & set(vocabulary["position"]))
    cell = ConceptWords(0, " ".join(position), "position", 0.9, {}, {" ".join(position): 0.9})
    assert concept_matches(cell, target)


def test_faithfulness_study_reports_per_family_and_the_text_bounds(world, mask_world):
    from modeling_segcompass.interpret.faithfulness import faithfulness_study

    _, processor, tokenizer, _, _ = world
    model, batch = mask_world
    rng = np.random.default_rng(10)
    labels = build_concept_labels(
        model, [batch([scene(rng, t % 2) for t in range(4)]) for _ in range(2)], tokenizer, top_k=3
    )
    words = concepts_in_words(labels, {"position": ["left", "right"]})
    rows = []
    for s, side in enumerate((0, 1) * 3):
        image, instruction, response, masks = scene(np.random.default_rng(300 + s), side)
        rows.append(
            {"image": image, "instruction": instruction, "response": response,
             "masks": masks, "side": ("left", "right")[side]}
        )  # fmt: skip
    study = faithfulness_study(
        model, rows, processor, words=words,
        target_words=lambda row, j: {row["side"]}, family=lambda row: row["side"],
        orders=("greedy", "weight"), k=2, max_k=4, random_draws=2, batch_size=4,
    )  # fmt: skip
    assert set(study.families) == {"all", "left", "right"}
    right = study.families["right"]
    assert right.num_slots == 3
    # on "right" images the named concept carries the mask; random ones do not
    assert right.change_at_k["weight"] > 0.5 > right.change_at_k["random"]
    assert right.all_concepts_removed > 0.5 and right.no_text >= right.all_concepts_removed - 1e-6
    # its first concepts include the planted word, whose label names the target's side
    assert right.purity["weight"] > 0
    data = study.to_dict()
    assert data["families"]["right"]["change_at_2"]["weight"] == right.change_at_k["weight"]
    with pytest.raises(ValueError, match="k <= max_k"):
        faithfulness_study(model, rows, processor, k=5, max_k=4)
