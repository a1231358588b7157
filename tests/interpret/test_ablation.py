"""interpret/ablation.py: concept ablation / swap, ranking, prompt dependence and the study.

On the known world (`known_world.build_world`) and on its variant whose mask path goes
through the concepts (`known_world.build_mask_world`).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from modeling_segcompass.interpret.ablation import (
    ablate_concepts,
    concept_ablation_study,
    mask_prompt_dependence,
    rank_concepts_by_effect,
)
from modeling_segcompass.interpret.edits import _gt_iou, _run_edits
from modeling_segcompass.interpret.trace import (
    _FORWARD_KEYS,
    _active_latents,
    _binary_iou,
    _forward,
)
from tests.interpret.known_world import LEFT, RIGHT, scene


def test_ablating_an_inactive_latent_changes_nothing_and_matches_a_manual_edit(world):
    model, _, _, batch, _ = world
    inputs = batch([scene(np.random.default_rng(5), t) for t in (0, 1)])
    output = _forward(model, inputs)
    inactive = sorted(
        set(range(model.config.d_sae))
        - set(output.concept_indices[output.concept_values > 0].tolist())
    )
    result = ablate_concepts(model, inputs, [inactive[0]], output=output)
    torch.testing.assert_close(result.mask_logits, output.mask_logits, atol=1e-5, rtol=0)
    assert (result.mask_iou_to_original == 1).all() and (result.prob_change < 1e-6).all()
    assert (result.soft_mask_change < 1e-6).all() and (result.mask_logit_change < 1e-4).all()
    assert (result.heatmap_change < 1e-4).all()
    # per-row ids: removing LEFT from row 0 only equals the model's own edit hook
    result = ablate_concepts(model, inputs, [[LEFT], []], output=output)

    def edit(indices, values):
        drop = (indices == LEFT) & (torch.arange(2)[:, None, None] == 0)
        return indices, values.masked_fill(drop, 0)

    manual = model(**{k: inputs[k] for k in _FORWARD_KEYS if k in inputs}, edit_concepts=edit)
    torch.testing.assert_close(result.heatmap_logits, manual.heatmap_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.conf_logits, manual.conf_logits, atol=1e-5, rtol=1e-5)
    assert result.concept_ids == [[LEFT], []]
    # gt given: IoU with the target before/after is reported, the change is their difference
    assert torch.isfinite(result.gt_iou_before).all()
    torch.testing.assert_close(result.iou_change, result.gt_iou_after - result.gt_iou_before)


def test_swapping_the_concept_gives_the_other_words_slot(world):
    model, _, _, batch, _ = world
    rng = np.random.default_rng(6)
    image, instruction, _, masks = scene(rng, 0)
    inputs = batch([(image, instruction, "<think> left </think> <REF_POS>", masks)])
    other = batch([(image, instruction, "<think> right </think> <REF_POS>", masks)])
    swapped = ablate_concepts(model, inputs, swap={LEFT: RIGHT})
    right = _forward(model, other)
    left = _forward(model, inputs)
    # "left" with its concept renamed to RIGHT moves the heatmap towards the "right" one
    to_right = (swapped.heatmap_logits - right.heatmap_logits).abs().mean()
    before = (left.heatmap_logits - right.heatmap_logits).abs().mean()
    assert to_right < 0.5 * before


def test_top_concepts_move_the_slot_more_than_random_active_ones(world):
    model, _, _, batch, word_ids = world
    inputs = batch([scene(np.random.default_rng(7)) for _ in range(4)])
    output = _forward(model, inputs)
    study = concept_ablation_study(model, inputs, top_n=1, random_draws=4, output=output)
    assert len(study.records) == 4
    for record in study.records:
        word = int(inputs["input_ids"][record.sample].eq(7).nonzero()[0, 0]) + 1
        expected = LEFT if int(inputs["input_ids"][record.sample, word]) == word_ids[0] else RIGHT
        assert record.top_concepts == [expected]
    # the heatmap (where the slot points) moves far more for the known concept
    rows, zero = [], []
    for record in study.records:
        active = sorted(_active_latents(output, record.sample) - set(record.top_concepts))
        draws = np.random.default_rng(0).choice(active, size=4, replace=False).tolist()
        rows += [record.sample] * 5
        zero += [record.top_concepts] + [[d] for d in draws]
    _, heat, _ = _run_edits(model, inputs, output, rows, zero)
    change = (heat - output.heatmap_logits[torch.tensor(rows)]).abs().flatten(1).mean(1)
    change = change.view(-1, 5)  # (records, 1 top + 4 random)
    # measured: ~1.5x the largest random draw (an untrained mask path is nearly flat)
    assert (change[:, 0] > change[:, 1:].max(1).values).all()
    assert change[:, 0].mean() > 2 * change[:, 1:].mean()
    assert study.fraction_top_greater >= 0 and "top-1" in study.to_markdown()


def test_rank_concepts_by_effect_covers_active_candidates(world):
    model, _, _, batch, _ = world
    inputs = batch([scene(np.random.default_rng(8), 0)])
    output = _forward(model, inputs)
    (ranking,) = rank_concepts_by_effect(model, inputs, max_candidates=6, output=output)
    assert ranking.slots == [0] and len(ranking.effects) == 6
    active = _active_latents(output, 0)
    assert {e.latent_id for e in ranking.effects} <= active
    assert LEFT in {e.latent_id for e in ranking.effects}  # the heaviest concept is a candidate
    keys = [(e.mask_change, e.soft_mask_change, e.mask_logit_change) for e in ranking.effects]
    assert keys == sorted(keys, reverse=True)


def test_ablate_concepts_refuses_unclear_requests(world):
    model, _, _, batch, _ = world
    inputs = batch([scene(np.random.default_rng(9))])
    with pytest.raises(ValueError, match="say what to remove"):
        ablate_concepts(model, inputs)
    with pytest.raises(ValueError, match="d_sae"):
        ablate_concepts(model, inputs, [10**6])
    with pytest.raises(TypeError, match="SegCompassProcessor batch"):
        ablate_concepts(model, [1, 2], [1])


def test_ablating_the_slots_concept_changes_its_mask_more_than_random_ones(mask_world):
    model, batch = mask_world
    inputs = batch([scene(np.random.default_rng(200 + i)) for i in range(8)])
    output = _forward(model, inputs, targets=True)
    gt_iou = _gt_iou(output, output.mask_logits, inputs, range(8), 0.0)[:, 0]
    assert float(gt_iou.mean()) > 0.6  # the trained path segments the named square
    study = concept_ablation_study(model, inputs, top_n=1, random_draws=4, output=output)
    assert len(study.records) == 8
    assert all(r.top_concepts[0] in (LEFT, RIGHT) for r in study.records)
    # measured: top-1 mask change ~0.44 (1.0 on every "right" sample), random 0.000
    assert study.mean_top["mask_change"] > 0.25
    assert study.mean_random["mask_change"] < 0.02
    assert study.mean_top["mask_change"] > 10 * study.mean_random["mask_change"] + 0.2
    # the continuous measures order every slot the same way
    for record in study.records:
        for name in ("soft_mask_change", "mask_logit_change", "heatmap_change"):
            assert record.top[name] > 3 * max(record.random[name]), (name, record)
    assert study.fraction_top_greater == 1.0 and study.wilcoxon_p < 0.01
    # the masks follow the heatmaps here: blanking the prompt empties them
    assert study.prompt_dependence > 0.9
    # a "right" sample: giving RIGHT's activations to LEFT moves the mask to the left square
    image, instruction, _, masks = scene(np.random.default_rng(300), 1)
    left_masks = scene(np.random.default_rng(300), 0)[3]
    right = batch([(image, instruction, "<think> right </think> <REF_POS>", masks)])
    swapped = ablate_concepts(model, right, swap={RIGHT: LEFT})
    on_left = _binary_iou(swapped.masks[0, 0], torch.from_numpy(left_masks[0]) > 0,
                            torch.ones(64, 64, dtype=torch.bool))  # fmt: skip
    assert float(on_left) > 0.6 and float(swapped.mask_change[0, 0]) > 0.9


def test_prompt_dependence_is_zero_when_the_decoder_ignores_its_prompt(mask_world):
    """A decoder whose dense prompt is constant: no concept edit can move a mask, and the
    study says so instead of reporting a bare 0."""
    model, batch = mask_world
    deaf = copy.deepcopy(model)
    with torch.no_grad():  # the dense prompt no longer depends on the heatmap
        deaf.prompt_encoder.mask_embed.conv3.weight.zero_()
    inputs = batch([scene(np.random.default_rng(400 + i)) for i in range(4)])
    heard = mask_prompt_dependence(model, inputs)
    ignored = mask_prompt_dependence(deaf, inputs)
    assert (heard.mask_change > 0.9).all() and (heard.heatmap_change > 1).all()
    assert (ignored.mask_change == 0).all() and (ignored.mask_logit_change < 1e-4).all()
    study = concept_ablation_study(deaf, inputs, top_n=1, random_draws=2)
    assert study.mean_top["mask_change"] == 0.0 and study.prompt_dependence == 0.0
    # the concept still moves the heatmap (where the slot points), just not the mask
    assert study.mean_top["heatmap_change"] > 10 * study.mean_random["heatmap_change"]
    assert "Blanking the heatmap prompt changes the masks by 0.000" in study.to_markdown()
    with pytest.raises(ValueError, match="blank must be"):
        mask_prompt_dependence(model, inputs, blank="none")
