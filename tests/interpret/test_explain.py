"""interpret/explain.py: the concept trace of each slot (concepts, tokens, heatmap, mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_segcompass.interpret.explain import build_explanation_inputs, explain
from modeling_segcompass.interpret.trace import _forward
from tests.interpret.known_world import ACTIVATION, LEFT, RIGHT, WORDS, scene


def test_explain_names_the_known_concept_and_its_token(world):
    model, _, tokenizer, batch, word_ids = world
    rows = [scene(np.random.default_rng(3), t) for t in (0, 1)]
    inputs = batch(rows)
    output = _forward(model, inputs)
    explanations = explain(model, inputs, output, tokenizer=tokenizer, top_n=4)
    for target, explanation in enumerate(explanations):
        (slot,) = explanation.slots
        top = slot.concepts[0]
        assert top.latent_id == (LEFT, RIGHT)[target]
        # it fired on exactly one token: the CoT word, with the hand-set activation
        assert top.num_tokens == 1
        (token,) = top.tokens
        assert token.token == WORDS[target] and token.kind == "cot"
        assert inputs["input_ids"][target, token.position] == word_ids[target]
        assert token.activation == pytest.approx(ACTIVATION, rel=0.05)
        assert explanation.completion.startswith("<think> " + WORDS[target])
        assert explanation.image_size == (64, 64) and slot.mask.shape == (64, 64)
        assert slot.has_ref and 0 < slot.confidence < 1


def test_explain_concepts_are_the_active_latents_with_their_weights():
    torch.manual_seed(0)
    from tests.helpers import build_tiny_model, make_batch

    model = build_tiny_model()
    inputs = make_batch(model.config, [2, 1])
    output = _forward(model, inputs)
    explanations = explain(model, inputs, output, top_n=6, tokens_per_concept=100)
    for b, explanation in enumerate(explanations):
        active = output.concept_values[b] > 0
        for k, slot in enumerate(explanation.slots):
            assert slot.has_ref == bool(output.ref_mask[b, k])
            shares = [c.share for c in slot.concepts]
            assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-6
            for concept in slot.concepts:
                hit = (output.concept_indices[b] == concept.latent_id) & active  # (L, n)
                expected = output.slot_concept_weights[b, k][hit].sum()
                assert concept.weight == pytest.approx(float(expected), rel=1e-5)
                assert concept.num_tokens == int(hit.sum()) == len(concept.tokens)
                positions = sorted(t.position for t in concept.tokens)
                assert positions == sorted(hit.nonzero()[:, 0].tolist())
                for t in concept.tokens:
                    value = output.concept_values[b][t.position][
                        output.concept_indices[b][t.position] == concept.latent_id
                    ]
                    assert t.activation == pytest.approx(float(value.sum()), rel=1e-6)
        data = explanation.to_dict()
        assert (
            data["slots"][0]["concepts"][0]["latent_id"]
            == explanation.slots[0].concepts[0].latent_id
        )
    # the third slot of row 1 has no <REF_POS>: never kept
    assert not explanations[1].slots[1].kept and not explanations[1].slots[1].has_ref


def test_explain_maps_come_back_at_the_original_size(world):
    model, processor, tokenizer, _, _ = world
    image = np.random.default_rng(4).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    inputs = build_explanation_inputs(
        processor, [image], ["the square"], ["<think> left </think> <REF_POS><|im_end|>"]
    )
    assert inputs["input_ids"][0].tolist().count(2) == 2  # user turn + answer, not doubled
    (explanation,) = explain(model, inputs, tokenizer=tokenizer)
    assert explanation.image_size == (48, 80)
    assert explanation.slots[0].heatmap.shape == (48, 80)
    heat = explanation.slots[0].heatmap
    assert float(heat.min()) >= 0 and float(heat.max()) <= 1


def test_explain_ranks_by_attribution_and_prints_concepts_in_words(world, mask_world):
    from modeling_segcompass.interpret.labels import build_concept_labels, concepts_in_words

    _, _, tokenizer, _, _ = world
    model, batch = mask_world
    rng = np.random.default_rng(10)
    labels = build_concept_labels(
        model, [batch([scene(rng, t % 2) for t in range(4)]) for _ in range(2)], tokenizer, top_k=3
    )
    words = concepts_in_words(labels, {"position": list(WORDS)})
    inputs = batch([scene(np.random.default_rng(s), 1) for s in (3, 4)])
    (first, second) = explain(
        model, inputs, tokenizer=tokenizer, words=words, rank_by="attribution", top_n=4
    )
    for explanation in (first, second):
        (slot,) = explanation.slots
        carried = [c.attribution for c in slot.concepts]
        assert all(v is not None for v in carried) and carried == sorted(carried, reverse=True)
        assert slot.mask_area > 0
    text = first.to_text()
    assert "slot 0" in text and "carries" in text
    by_weight = explain(model, inputs, tokenizer=tokenizer, words=words, top_n=4)[0]
    assert by_weight.slots[0].concepts[0].latent_id == RIGHT
    assert by_weight.slots[0].concepts[0].words == 'position "right" (100%)'
    assert 'position "right"' in by_weight.to_text()
    with pytest.raises(ValueError, match="rank_by"):
        explain(model, inputs, tokenizer=tokenizer, rank_by="size")
