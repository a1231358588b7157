"""interpret/explain.py: explain, concept ablation / swap, quality vs accuracy, rendering.

The causal tests use a hand-built model with known concepts: the SAE is set so that latent
LEFT fires (activation 4) exactly on the CoT word "left" and latent RIGHT on "right", and
their codebook rows are large, so these latents are what the slot gathers.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
from modeling_segcompass.interpret import explain as I
from modeling_segcompass.interpret.labels import (
    build_concept_labels,
    compute_concept_codes,
    describe_tokens,
)
from modeling_segcompass.modeling_segcompass import _decoder_layers
from modeling_segcompass.processing_segcompass import SegCompassProcessor

WORDS = ("left", "right")
LEFT, RIGHT = 11, 23
ACTIVATION = 4.0


def scene(rng: np.random.Generator, target: int | None = None):
    """Two grey squares, one per half; the CoT word names the target's half."""
    image = np.full((64, 64, 3), 60, np.uint8)
    masks = []
    for x in (rng.integers(2, 16), rng.integers(34, 48)):
        y = rng.integers(2, 46)
        mask = np.zeros((64, 64), np.uint8)
        mask[y : y + 16, x : x + 16] = 1
        image[mask.astype(bool)] = 230
        masks.append(mask)
    t = int(rng.integers(2)) if target is None else target
    return image, "the square", f"<think> {WORDS[t]} </think> <REF_POS>", masks[t][None]


@pytest.fixture(scope="module")
def world():
    corpus = ["the square", *(f"<think> {w} </think> <REF_POS>" for w in WORDS)] * 5
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=400)
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=1)
    word_ids = [tokenizer.convert_tokens_to_ids("Ġ" + w) for w in WORDS]
    assert all(i != tokenizer.unk_token_id for i in word_ids)

    def batch(rows):
        return processor(
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]
        )

    torch.manual_seed(0)
    config = SegCompassConfig.tiny(vocab_size=len(tokenizer), num_slots=1)
    # The hand wiring below was measured on the random init of the former tiny preset
    # (prompt encoder with 8 mask channels); keep it, so the init and the margins asserted
    # below are the ones measured. The mask-level tests train their own mask path.
    config.sam_config.prompt_encoder_config.mask_input_channels = 8
    model = SegCompassForReasoningSegmentation(config).eval()
    rng = np.random.default_rng(0)
    reference = batch([scene(rng, t % 2) for t in range(8)])
    captured = {}
    layer = _decoder_layers(model.vlm)[config.sae_layer]
    handle = layer.register_forward_hook(
        lambda m, i, o: captured.update(h=o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model.vlm.model(
            **{
                k: reference[k]
                for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
            }
        )
    handle.remove()  # fmt: skip
    hidden, ids = captured["h"], reference["input_ids"]
    real = reference["attention_mask"].bool()
    sae = model.sae
    with torch.no_grad():
        x = hidden - sae.b_dec if sae.apply_b_dec_to_input else hidden
        for word_id, latent in zip(word_ids, (LEFT, RIGHT)):
            # a linear read-out of "this is the word", scaled so the word gets ACTIVATION
            selected = ids == word_id
            design = torch.cat([x[real], torch.ones(int(real.sum()), 1)], 1)
            w = torch.linalg.lstsq(design, selected[real].float().unsqueeze(1)).solution[:, 0]
            projection = x @ w[:-1] + w[-1]
            low, high = projection[selected].min(), projection[real & ~selected].max()
            assert low > high
            middle = (low + high) / 2
            scale = ACTIVATION / (projection[selected].mean() - middle)
            sae.W_enc[:, latent] = scale * w[:-1]
            sae.b_enc[latent] = scale * (w[-1] - middle)
        # Make the slot read these concepts: the slot query attends to their shared direction
        # (first codebook layer), and the fused slot query is driven by the slot.
        dim = config.codebook_dim
        common, side = torch.randn(dim), torch.randn(dim)
        common /= common.norm()
        side -= (side @ common) * common
        side /= side.norm()
        model.codebook.codebook[LEFT] = 3.0 * (common + side)
        model.codebook.codebook[RIGHT] = 3.0 * (common - side)
        model.codebook.slot_queries[0] = 3.0 * common
        attention = model.codebook.layers[0].self_attn
        attention.in_proj_weight[:dim] = 10.0 * torch.eye(dim)
        attention.in_proj_weight[dim : 2 * dim] = torch.eye(dim)
        attention.in_proj_bias[: 2 * dim] = 0.0
        model.slot_mapper.slot_proj.weight.mul_(20.0)
    return model, processor, tokenizer, batch, word_ids


# --------------------------------------------------------------------------- token roles
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
    output = I._forward(model, inputs)
    torch.testing.assert_close(values, output.concept_values)
    assert torch.equal(indices[values > 0], output.concept_indices[output.concept_values > 0])


# --------------------------------------------------------------------------- explain
def test_explain_names_the_known_concept_and_its_token(world):
    model, _, tokenizer, batch, word_ids = world
    rows = [scene(np.random.default_rng(3), t) for t in (0, 1)]
    inputs = batch(rows)
    output = I._forward(model, inputs)
    explanations = I.explain(model, inputs, output, tokenizer=tokenizer, top_n=4)
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
    output = I._forward(model, inputs)
    explanations = I.explain(model, inputs, output, top_n=6, tokens_per_concept=100)
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
    inputs = I.build_explanation_inputs(
        processor, [image], ["the square"], ["<think> left </think> <REF_POS><|im_end|>"]
    )
    assert inputs["input_ids"][0].tolist().count(2) == 2  # user turn + answer, not doubled
    (explanation,) = I.explain(model, inputs, tokenizer=tokenizer)
    assert explanation.image_size == (48, 80)
    assert explanation.slots[0].heatmap.shape == (48, 80)
    heat = explanation.slots[0].heatmap
    assert float(heat.min()) >= 0 and float(heat.max()) <= 1


# --------------------------------------------------------------------------- ablation
def test_ablating_an_inactive_latent_changes_nothing_and_matches_a_manual_edit(world):
    model, _, _, batch, _ = world
    inputs = batch([scene(np.random.default_rng(5), t) for t in (0, 1)])
    output = I._forward(model, inputs)
    inactive = sorted(
        set(range(model.config.d_sae))
        - set(output.concept_indices[output.concept_values > 0].tolist())
    )
    result = I.ablate_concepts(model, inputs, [inactive[0]], output=output)
    torch.testing.assert_close(result.mask_logits, output.mask_logits, atol=1e-5, rtol=0)
    assert (result.mask_iou_to_original == 1).all() and (result.prob_change < 1e-6).all()
    assert (result.soft_mask_change < 1e-6).all() and (result.mask_logit_change < 1e-4).all()
    assert (result.heatmap_change < 1e-4).all()
    # per-row ids: removing LEFT from row 0 only equals the model's own edit hook
    result = I.ablate_concepts(model, inputs, [[LEFT], []], output=output)

    def edit(indices, values):
        drop = (indices == LEFT) & (torch.arange(2)[:, None, None] == 0)
        return indices, values.masked_fill(drop, 0)

    manual = model(**{k: inputs[k] for k in I._FORWARD_KEYS if k in inputs}, edit_concepts=edit)
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
    swapped = I.ablate_concepts(model, inputs, swap={LEFT: RIGHT})
    right = I._forward(model, other)
    left = I._forward(model, inputs)
    # "left" with its concept renamed to RIGHT moves the heatmap towards the "right" one
    to_right = (swapped.heatmap_logits - right.heatmap_logits).abs().mean()
    before = (left.heatmap_logits - right.heatmap_logits).abs().mean()
    assert to_right < 0.5 * before


def test_top_concepts_move_the_slot_more_than_random_active_ones(world):
    model, _, _, batch, word_ids = world
    inputs = batch([scene(np.random.default_rng(7)) for _ in range(4)])
    output = I._forward(model, inputs)
    study = I.concept_ablation_study(model, inputs, top_n=1, random_draws=4, output=output)
    assert len(study.records) == 4
    for record in study.records:
        word = int(inputs["input_ids"][record.sample].eq(7).nonzero()[0, 0]) + 1
        expected = LEFT if int(inputs["input_ids"][record.sample, word]) == word_ids[0] else RIGHT
        assert record.top_concepts == [expected]
    # the heatmap (where the slot points) moves far more for the known concept
    rows, zero = [], []
    for record in study.records:
        active = sorted(I._active_latents(output, record.sample) - set(record.top_concepts))
        draws = np.random.default_rng(0).choice(active, size=4, replace=False).tolist()
        rows += [record.sample] * 5
        zero += [record.top_concepts] + [[d] for d in draws]
    _, heat, _ = I._run_edits(model, inputs, output, rows, zero)
    change = (heat - output.heatmap_logits[torch.tensor(rows)]).abs().flatten(1).mean(1)
    change = change.view(-1, 5)  # (records, 1 top + 4 random)
    # measured: ~1.5x the largest random draw (an untrained mask path is nearly flat)
    assert (change[:, 0] > change[:, 1:].max(1).values).all()
    assert change[:, 0].mean() > 2 * change[:, 1:].mean()
    assert study.fraction_top_greater >= 0 and "top-1" in study.to_markdown()


def test_rank_concepts_by_effect_covers_active_candidates(world):
    model, _, _, batch, _ = world
    inputs = batch([scene(np.random.default_rng(8), 0)])
    output = I._forward(model, inputs)
    (ranking,) = I.rank_concepts_by_effect(model, inputs, max_candidates=6, output=output)
    assert ranking.slots == [0] and len(ranking.effects) == 6
    active = I._active_latents(output, 0)
    assert {e.latent_id for e in ranking.effects} <= active
    assert LEFT in {e.latent_id for e in ranking.effects}  # the heaviest concept is a candidate
    keys = [(e.mask_change, e.soft_mask_change, e.mask_logit_change) for e in ranking.effects]
    assert keys == sorted(keys, reverse=True)


def test_ablate_concepts_refuses_unclear_requests(world):
    model, _, _, batch, _ = world
    inputs = batch([scene(np.random.default_rng(9))])
    with pytest.raises(ValueError, match="say what to remove"):
        I.ablate_concepts(model, inputs)
    with pytest.raises(ValueError, match="d_sae"):
        I.ablate_concepts(model, inputs, [10**6])
    with pytest.raises(TypeError, match="SegCompassProcessor batch"):
        I.ablate_concepts(model, [1, 2], [1])


# --------------------------------------------------------------------------- labels
def test_concept_labels_name_the_known_latents(world, tmp_path):
    from modeling_segcompass.interpret.labels import load_concept_labels, save_concept_labels

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
    (explanation,) = I.explain(model, batches[0], concept_labels=again, tokenizer=tokenizer)[:1]
    assert explanation.slots[0].concepts[0].label in ("left", "right")
    with pytest.raises(FileNotFoundError, match="build_concept_labels"):
        load_concept_labels(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "concept_labels.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a SegCompass concept-label file"):
        load_concept_labels(tmp_path / "bad")


# --------------------------------------------------------------------------- statistics
def test_correlate_matches_hand_computed_values():
    x, y = [1, 2, 3, 4, 5], [2, 4, 5, 4, 5]
    pearson = I.correlate(x, y, method="pearson")
    assert pearson.r == pytest.approx(0.7745967, abs=1e-6)  # 3 / sqrt(10 * 1.5)
    z, half = math.atanh(pearson.r), 1.959964 / math.sqrt(2)
    assert pearson.ci_low == pytest.approx(math.tanh(z - half), abs=1e-5)
    assert pearson.ci_high == pytest.approx(math.tanh(z + half), abs=1e-5)
    spearman = I.correlate([1, 2, 3, 4, 5, 6], [1, 4, 9, 16, 25, 36])
    assert spearman.r == pytest.approx(1.0)
    few = I.correlate([1, 2], [2, 1])
    assert math.isnan(few.r) and few.n == 2
    with_nan = I.correlate([1, 2, float("nan"), 4, 5], [1, 2, 3, 4, 6], method="pearson")
    assert with_nan.n == 4
    boot = I.correlate(np.arange(30), np.arange(30) + np.random.default_rng(0).normal(0, 5, 30), ci_method="bootstrap", n_bootstrap=200)  # fmt: skip
    assert boot.ci_low <= boot.r <= boot.ci_high


def test_quality_vs_accuracy_on_known_world(world, tmp_path):
    model, processor, tokenizer, batch, _ = world
    rng = np.random.default_rng(11)
    rows = []
    for i in range(6):
        image, instruction, response, masks = scene(rng, i % 2)
        rows.append({"image": Image.fromarray(image), "instruction": instruction,
                     "response": response, "masks": masks, "family": "toy"})  # fmt: skip
    rows.append({**rows[0], "masks": np.zeros((0, 64, 64), np.uint8)})  # no target: skipped
    labels = build_concept_labels(model, [batch([scene(rng, t % 2) for t in range(4)])], tokenizer)
    report = I.concept_quality_vs_accuracy(
        model, rows, processor, batch_size=4, concept_labels=labels,
        target_attributes=lambda row, j: {"left" if "left" in row["response"] else "right"},
        plot_path=tmp_path / "quality.png",
    )  # fmt: skip
    assert [s.index for s in report.samples] == list(range(6))
    for sample in report.samples:
        assert 0 <= sample.iou <= 1 and sample.sae_fvu >= 0
        assert 0 < sample.slot_concentration <= 1
        # the slot's heaviest concept is the word's latent, named after the target's side
        assert sample.attribute_agreement > 0
    assert {(c.measure, c.method) for c in report.correlations} == {
        (m, k) for m in I.QUALITY_MEASURES for k in ("spearman", "pearson")
    }
    assert Image.open(report.plot_path).size[0] > 600
    assert "| measure |" in report.to_markdown()


# --------------------------------------------------------------------------- rendering
def test_render_and_report_show_what_they_say(world, tmp_path):
    model, _, tokenizer, batch, _ = world
    rng = np.random.default_rng(12)
    rows = [scene(rng, t) for t in (0, 1)]
    inputs = batch(rows)
    explanations = I.explain(model, inputs, tokenizer=tokenizer)
    explanations[0].slots[0].kept = True  # draw its mask whatever the untrained confidence
    explanations[0].slots[0].mask = torch.zeros(64, 64, dtype=torch.bool)
    explanations[0].slots[0].mask[:32, :32] = True
    path = I.render_explanation(explanations[0], rows[0][0], tmp_path / "one.png")
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    blue = np.array([31, 120, 181])  # slot 0's colour, blended over the image in the mask panel
    right_part = picture[:, int(picture.shape[1] * 0.75) :]
    close = (np.abs(right_part - (0.45 * 60 + 0.55 * blue)).sum(-1) < 30).sum()
    assert close > 200
    index = I.write_report(
        explanations, [r[0] for r in rows], tmp_path / "report", instructions=["a <b>", "c"]
    )
    text = index.read_text()
    assert "src='image_0.png'" in text and "src='image_1.png'" in text
    assert (tmp_path / "report" / "image_1.png").is_file()
    assert "a &lt;b&gt;" in text and f"<td>{LEFT}</td>" in text


# --------------------------------------------------------------------------- ablation -> masks
def _soft_iou_by_hand(p, q):
    return float(torch.minimum(p, q).sum() / torch.maximum(p, q).sum())


def test_change_measures_match_hand_computed_values():
    """The continuous measures on a 2 x 2 grid, by hand."""
    before = I.SegCompassOutput(
        mask_logits=torch.tensor([[[[-1.0, 2.0], [-30.0, 0.5]]]]),
        heatmap_logits=torch.zeros(1, 1, 2, 2),
        conf_logits=torch.zeros(1, 1),
    )
    after = torch.tensor([[[[-2.0, 3.0], [-20.0, -0.5]]]])
    valid = torch.tensor([[[True, True], [True, False]]])  # the last pixel is padding
    moved = I._changes(before, after, torch.ones(1, 1, 2, 2), torch.zeros(1, 1), [0], valid, 0.0)
    # binary: {(0,1)} before and after on the valid area -> IoU 1
    assert float(moved["mask_change"]) == 0.0
    assert float(moved["mask_logit_change"]) == pytest.approx((1 + 1 + 10) / 3)
    p = torch.sigmoid(torch.tensor([-1.0, 2.0, -30.0], dtype=torch.float64))
    q = torch.sigmoid(torch.tensor([-2.0, 3.0, -20.0], dtype=torch.float64))
    assert float(moved["soft_mask_change"]) == pytest.approx(1 - _soft_iou_by_hand(p, q), rel=1e-5)
    assert float(moved["prob_change"]) == pytest.approx(float((p - q).abs().mean()), rel=1e-5)
    assert float(moved["heatmap_change"]) == pytest.approx(1.0)
    # soft IoU of 0/1 maps is the binary IoU
    a, b = torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(I._soft_iou(a, b, torch.ones(2, 2, dtype=torch.bool))) == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def mask_world(world):
    """The known-concept world, with a mask path that goes through the concepts.

    A copy of the hand-built model, changed so that the slot *is* its concept and the
    heatmap and mask follow the slot, then trained for a few seconds:
    * query codebook: the slot query reads the CoT word's latent (its key direction b is
      orthogonal to the slot's own direction a, so the slot does not attend to itself), and
      the slot carries that latent's embedding (value / output projections identity, the
      rest of the encoder an identity). LEFT and RIGHT differ in the `side` direction;
    * slot mapper: the `<REF_POS>` half of the fused input is switched off (LayerNorm weight
      and bias 0, frozen), so the side can only come from the concepts;
    * mask decoder: ~80 Adam steps on random smooth prompts, target "the prompt's positive
      area", so that it follows its dense prompt (what SAM's mask-prompt training gives);
    * slot mapper: ~150 Adam steps of heatmap BCE + Dice to the target square.
    Measured (seed fixed): heatmap IoU with the target ~0.85, mask IoU ~0.8.
    """
    base, processor, tokenizer, batch, word_ids = world
    model = copy.deepcopy(base)
    config, dim, d = model.config, model.config.codebook_dim, model.config.llm_hidden_size
    gen = torch.Generator().manual_seed(1)
    a, b, side = torch.linalg.qr(torch.randn(dim, 3, generator=gen))[0].T
    with torch.no_grad():
        model.codebook.codebook[LEFT] = 3.0 * (b + side)
        model.codebook.codebook[RIGHT] = 3.0 * (b - side)
        model.codebook.slot_queries[0] = 3.0 * a
        for n, layer in enumerate(model.codebook.layers):
            attention = layer.self_attn
            attention.in_proj_weight[:dim] = 10.0 * torch.outer(b, a)
            attention.in_proj_weight[dim:] = torch.eye(dim).repeat(2, 1)
            attention.in_proj_bias.zero_()
            attention.out_proj.weight.copy_(torch.eye(dim) if n == 0 else torch.zeros(dim, dim))
            attention.out_proj.bias.zero_()
            layer.linear2.weight.zero_()
            layer.linear2.bias.zero_()
        model.slot_mapper.fuse_norm.weight[d:] = 0.0
        model.slot_mapper.fuse_norm.bias[d:] = 0.0
    model.slot_mapper.fuse_norm.requires_grad_(False)
    rng = np.random.default_rng(100)
    train = batch([scene(rng) for _ in range(48)])
    captured = {}
    hook = model.slot_mapper.register_forward_hook(
        lambda m, i, o: captured.update(slots=i[0], ref=i[1], emb=i[2])
    )
    I._forward(model, train)
    hook.remove()
    slots, ref, emb = (captured[k].detach() for k in ("slots", "ref", "emb"))
    target = train["gt_masks"].float()[:, :1]
    model.train()
    decoder = [
        p
        for m in (model.prompt_encoder.mask_embed, model.mask_decoder)
        for p in m.parameters()
        if p.requires_grad
    ]
    optimizer = torch.optim.Adam(decoder, lr=3e-3)
    for _ in range(80):
        pick = torch.randint(0, len(emb), (16,), generator=gen)
        field = F.interpolate(torch.randn(16, 1, 4, 4, generator=gen), size=config.mask_size,
                              mode="bilinear", align_corners=False)  # fmt: skip
        field = 10.0 * field - 10.0 * torch.rand(16, 1, 1, 1, generator=gen)
        masks, _ = model.decode_masks(field, emb[pick])
        loss = F.binary_cross_entropy_with_logits(masks, (field > 0).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mapper = [p for p in model.slot_mapper.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(mapper, lr=3e-3)
    for _ in range(150):
        pick = torch.randint(0, len(emb), (16,), generator=gen)
        heat = model.slot_mapper(slots[pick], ref[pick], emb[pick]).heatmap_logits
        prob, y = torch.sigmoid(heat), target[pick]
        dice = 1 - (2 * (prob * y).flatten(1).sum(1) + 1) / ((prob + y).flatten(1).sum(1) + 1)
        loss = F.binary_cross_entropy_with_logits(heat, y) + dice.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, batch


def test_ablating_the_slots_concept_changes_its_mask_more_than_random_ones(mask_world):
    model, batch = mask_world
    inputs = batch([scene(np.random.default_rng(200 + i)) for i in range(8)])
    output = I._forward(model, inputs, targets=True)
    gt_iou = I._gt_iou(output, output.mask_logits, inputs, range(8), 0.0)[:, 0]
    assert float(gt_iou.mean()) > 0.6  # the trained path segments the named square
    study = I.concept_ablation_study(model, inputs, top_n=1, random_draws=4, output=output)
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
    swapped = I.ablate_concepts(model, right, swap={RIGHT: LEFT})
    on_left = I._binary_iou(swapped.masks[0, 0], torch.from_numpy(left_masks[0]) > 0,
                            torch.ones(64, 64, dtype=torch.bool))  # fmt: skip
    assert float(on_left) > 0.6 and float(swapped.mask_change[0, 0]) > 0.9


def test_prompt_dependence_is_zero_when_the_decoder_ignores_its_prompt(mask_world):
    """The diagnosis of the trained tiny models: if the dense prompt is constant, no concept
    edit can move a mask; the study says so instead of reporting a bare 0."""
    model, batch = mask_world
    deaf = copy.deepcopy(model)
    with torch.no_grad():  # the dense prompt no longer depends on the heatmap
        deaf.prompt_encoder.mask_embed.conv3.weight.zero_()
    inputs = batch([scene(np.random.default_rng(400 + i)) for i in range(4)])
    heard = I.mask_prompt_dependence(model, inputs)
    ignored = I.mask_prompt_dependence(deaf, inputs)
    assert (heard.mask_change > 0.9).all() and (heard.heatmap_change > 1).all()
    assert (ignored.mask_change == 0).all() and (ignored.mask_logit_change < 1e-4).all()
    study = I.concept_ablation_study(deaf, inputs, top_n=1, random_draws=2)
    assert study.mean_top["mask_change"] == 0.0 and study.prompt_dependence == 0.0
    # the concept still moves the heatmap (where the slot points), just not the mask
    assert study.mean_top["heatmap_change"] > 10 * study.mean_random["heatmap_change"]
    assert "Blanking the heatmap prompt changes the masks by 0.000" in study.to_markdown()
    with pytest.raises(ValueError, match="blank must be"):
        I.mask_prompt_dependence(model, inputs, blank="none")


def test_render_ablation_shows_the_mask_moving(mask_world, tmp_path):
    model, batch = mask_world
    row = scene(np.random.default_rng(500), 1)  # "right": removing RIGHT moves the mask
    inputs = batch([row])
    output = I._forward(model, inputs)
    active = sorted(I._active_latents(output, 0) - {LEFT, RIGHT})
    edits = {
        "top-1 removed": I.ablate_concepts(model, inputs, top_n=1, slot=0, output=output),
        "1 random removed": I.ablate_concepts(model, inputs, [active[0]], output=output),
    }
    assert edits["top-1 removed"].concept_ids == [[RIGHT]]
    path = I.render_ablation(output, edits, 0, 0, tmp_path / "ablation.png", image=row[0])
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    bottom = picture[picture.shape[0] // 2 :]
    width = picture.shape[1] // 3
    # mask pixels are blended with slot 0's blue: blue - red = 0.55 * (181 - 31) ~ 82
    blue = [
        int(((p[..., 2] - p[..., 0]) > 50).sum()) for p in np.split(bottom[:, : 3 * width], 3, 1)
    ]
    unedited, top, random = blue
    assert unedited > 500 and abs(random - unedited) < 0.1 * unedited
    expected = [
        int((m > 0).sum())
        for m in (output.mask_logits[0, 0], edits["top-1 removed"].mask_logits[0, 0])
    ]
    assert (top > unedited) == (expected[1] > expected[0])  # drawn as computed
    assert float(edits["top-1 removed"].mask_change[0, 0]) > 0.9
