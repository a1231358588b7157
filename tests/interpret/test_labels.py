"""interpret/labels.py: token roles, concept codes and concept labels on the known world."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_segcompass.interpret.explain import explain
from modeling_segcompass.interpret.labels import (
    build_concept_labels,
    compute_concept_codes,
    describe_tokens,
    load_concept_labels,
    save_concept_labels,
)
from modeling_segcompass.interpret.trace import _forward
from tests.interpret.known_world import LEFT, RIGHT, scene


def test_describe_tokens_roles_and_patch_grid(world):
    model, processor, tokenizer, batch, word_ids = world
    inputs = batch([scene(np.random.default_rng(1), 0)])
    (row,) = describe_tokens(
        inputs["input_ids"], model.config, attention_mask=inputs["attention_mask"],
        image_grid_thw=inputs["image_grid_thw"], tokenizer=tokenizer,
    )  # fmt: skip
    visual = [t for t in row if t.kind == "visual"]
    # 64 px, patch 8, merge 2: a 4 x 4 grid of merged patches, row-major
    assert [t.patch for t in visual] == [(0, r, c) for r in range(4) for c in range(4)]
    assert visual[5].token == "patch(1,1)"
    kinds = {t.token_id: t.kind for t in row if t.kind != "visual"}
    assert kinds[word_ids[0]] == "cot" and kinds[7] == "cot" and kinds[8] == "cot"
    assert kinds[model.config.ref_token_id] == "ref"
    assert next(t for t in row if t.token_id == word_ids[0]).token == "left"
    assert row[0].kind == "prompt"


def test_concept_codes_match_forward(world):
    model, _, _, batch, _ = world
    inputs = batch([scene(np.random.default_rng(2)) for _ in range(3)])
    indices, values = compute_concept_codes(model, inputs)
    output = _forward(model, inputs)
    torch.testing.assert_close(values, output.concept_values)
    assert torch.equal(indices[values > 0], output.concept_indices[output.concept_values > 0])


def test_concept_labels_name_the_known_latents(world, tmp_path):
    model, _, tokenizer, batch, _ = world
    rng = np.random.default_rng(10)
    batches = [batch([scene(rng, t % 2) for t in range(4)]) for _ in range(2)]
    labels = build_concept_labels(model, batches, tokenizer, top_k=3)
    assert labels.label(LEFT) == "left" and labels.label(RIGHT) == "right"
    assert labels[LEFT].num_fired == 4 and labels[LEFT].visual_share == 0.0
    assert labels[LEFT].top_tokens[0].kind == "cot"
    assert labels.num_samples == 8
    some_visual = [c for c in labels.latents.values() if c.top_patches]
    assert some_visual and all(
        0 <= p.row < 4 and 0 <= p.col < 4 for p in some_visual[0].top_patches
    )
    path = save_concept_labels(labels, tmp_path)
    assert path.name == "concept_labels.json"
    again = load_concept_labels(tmp_path)
    assert again.to_dict() == labels.to_dict()
    (explanation,) = explain(model, batches[0], concept_labels=again, tokenizer=tokenizer)[:1]
    assert explanation.slots[0].concepts[0].label in ("left", "right")
    with pytest.raises(FileNotFoundError, match="build_concept_labels"):
        load_concept_labels(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "concept_labels.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a SegCompass concept-label file"):
        load_concept_labels(tmp_path / "bad")
