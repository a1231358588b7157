"""The whole forward on tiny models: values, invariants, losses, round trips."""

import pytest
import torch

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.modeling_segcompass import _decoder_layers, gather_ref_hidden_states
from tests.helpers import REF, build_tiny_model, make_batch


def test_gather_ref_states_takes_last_k_in_order_and_zero_fills():
    hidden = torch.arange(2 * 8 * 3, dtype=torch.float).view(2, 8, 3)
    ids = torch.tensor([
        [1, REF, 2, REF, REF, REF, 3, 0],  # 4 refs, K=3 -> positions 3, 4, 5
        [1, 2, REF, 3, 0, 0, 0, 0],  # 1 ref -> slot 0 only
    ])  # fmt: skip
    states, present = gather_ref_hidden_states(hidden, ids, REF, 3)
    torch.testing.assert_close(states[0], hidden[0, [3, 4, 5]])
    torch.testing.assert_close(states[1, 0], hidden[1, 2])
    assert states[1, 1:].abs().sum() == 0
    assert present.tolist() == [[True, True, True], [True, False, False]]
    none, present_none = gather_ref_hidden_states(hidden, torch.zeros_like(ids), REF, 3)
    assert none.abs().sum() == 0 and not present_none.any()


def test_forward_outputs_documented_shapes_and_consistent_values():
    model = build_tiny_model()
    batch = make_batch(model.config, [3, 1])
    with torch.no_grad():
        out = model(**batch)
    B, L = batch["input_ids"].shape
    K, M, k = model.config.num_slots, model.config.mask_size, model.config.sae_k
    assert out.logits.shape == (B, L, model.config.vlm_text_config.vocab_size)
    assert out.heatmap_logits.shape == (B, K, M, M) and out.mask_logits.shape == (B, K, M, M)
    assert out.conf_logits.shape == (B, K) and out.iou_scores.shape == (B, K)
    assert out.concept_indices.shape == (B, L, k) and out.concept_values.shape == (B, L, k)
    assert out.slot_concept_weights.shape == (B, K, L, k)
    assert out.ref_mask.tolist() == [[True] * 3, [True, False, False]]
    assert out.loss is None
    # padding carries no concept
    pad = batch["attention_mask"] == 0
    assert out.concept_values[pad].abs().sum() == 0
    # logits equal the VLM's own forward (one pass reproduces the plain model)
    with torch.no_grad():
        plain = model.vlm(
            **{
                k_: batch[k_]
                for k_ in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
            }
        )
    torch.testing.assert_close(out.logits, plain.logits)


def test_sae_input_is_the_hidden_state_at_sae_layer():
    model = build_tiny_model()
    batch = make_batch(model.config, [1])
    captured = {}
    layer = _decoder_layers(model.vlm)[model.config.sae_layer]
    layer.register_forward_hook(
        lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        out = model(**batch)
        plain = model.vlm.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
            output_hidden_states=True,
        )  # fmt: skip
    # decoder layer i's output is hidden_states[i + 1]
    torch.testing.assert_close(captured["h"], plain.hidden_states[model.config.sae_layer + 1])
    codes = model.sae.encode(plain.hidden_states[model.config.sae_layer + 1])
    torch.testing.assert_close(out.concept_indices, codes.indices)
    torch.testing.assert_close(out.concept_values, codes.values)


def test_sparse_and_dense_codebook_paths_give_the_same_masks():
    model = build_tiny_model()
    batch = make_batch(model.config, [3, 2])
    with torch.no_grad():
        sparse = model(**batch, sparse_codebook=True)
        dense = model(**batch, sparse_codebook=False)
    torch.testing.assert_close(sparse.mask_logits, dense.mask_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse.conf_logits, dense.conf_logits, rtol=1e-4, atol=1e-5)


def test_batched_mask_decoding_equals_per_slot_loop():
    model = build_tiny_model()
    heat = torch.randn(2, 3, 64, 64)
    image = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        masks, iou = model.decode_masks(heat, image)
        for b in range(2):
            for k in range(3):
                one, one_iou = model.decode_masks(heat[b : b + 1, k : k + 1], image[b : b + 1])
                torch.testing.assert_close(masks[b, k], one[0, 0], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(iou[b, k], one_iou[0, 0], rtol=1e-4, atol=1e-5)


def test_precomputed_image_embeddings_match_encoder_path():
    model = build_tiny_model()
    batch = make_batch(model.config, [2])
    with torch.no_grad():
        full = model(**batch)
        embeds = model.encode_image(batch["sam_pixel_values"])
        batch_pre = {k: v for k, v in batch.items() if k != "sam_pixel_values"}
        pre = model(**batch_pre, image_embeddings=embeds)
    torch.testing.assert_close(full.mask_logits, pre.mask_logits)


def test_a_training_step_encodes_each_distinct_image_once_with_the_same_numbers():
    """A GRPO batch repeats each prompt's image per generation: encoded once, shared."""
    model = build_tiny_model().train()
    batch = make_batch(model.config, [3, 3, 3, 3], with_targets=True, num_objects=[2, 1, 1, 0])
    pixels = batch["sam_pixel_values"]
    batch["sam_pixel_values"] = pixels[[0, 1, 0, 1]]  # two images, each twice, interleaved
    seen = []
    handle = model.image_encoder.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))

    def step(deduplicate):
        model.zero_grad(set_to_none=True)
        original = model.encode_image
        model.encode_image = lambda x, **_: original(x, deduplicate=deduplicate)
        try:
            out = model(**batch)
        finally:
            del model.encode_image
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    shared, shared_grads = step(None)  # the default while gradients are recorded
    assert seen == [2]  # two distinct images encoded once each
    each, each_grads = step(False)
    assert seen == [2, 4]
    handle.remove()
    torch.testing.assert_close(shared.loss, each.loss)
    torch.testing.assert_close(shared.mask_logits, each.mask_logits)
    assert shared_grads.keys() == each_grads.keys()
    for name in shared_grads:  # the encoder's gradient sums the copies in another order
        torch.testing.assert_close(shared_grads[name], each_grads[name], rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # inference reads no pixels to look for duplicates
        model.encode_image(batch["sam_pixel_values"])
    assert seen == [2, 4]


def test_losses_with_targets_and_weights_from_config():
    model = build_tiny_model().train()
    batch = make_batch(model.config, [3, 3, 3], with_targets=True, num_objects=[2, 1, 0])
    out = model(**batch)
    cfg = model.config
    expected = (
        cfg.lm_loss_weight * out.lm_loss
        + cfg.seg_loss_weight * out.seg_loss
        + cfg.conf_loss_weight * out.conf_loss
        + cfg.sae_reconstruction_weight * out.sae_loss
    )
    torch.testing.assert_close(out.loss, expected)
    # random init: the LM loss is near log(V)
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(128.0)).item()) < 1.0
    # matching: 2, 1 and 0 slots matched
    assert (out.slot_to_target >= 0).sum(-1).tolist() == [2, 1, 0]
    out.loss.backward()
    for name in ("sae.W_enc", "codebook.codebook", "slot_mapper.fuse_proj.weight",
                 "mask_decoder.iou_prediction_head.proj_in.weight", "prompt_encoder.mask_embed.conv1.weight",
                 "image_encoder.head.weight", "vlm.model.visual.merger.mlp.0.weight"):  # fmt: skip
        param = dict(model.named_parameters())[name]
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_unused_sam_prompt_parts_are_frozen():
    model = build_tiny_model()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "prompt_encoder.no_mask_embed.weight" in frozen
    assert "mask_decoder.output_hypernetworks_mlps.1.proj_in.weight" in frozen
    assert "mask_decoder.output_hypernetworks_mlps.0.proj_in.weight" not in frozen


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b.pop("sam_pixel_values"), "sam_pixel_values"),
        (lambda b: b.update(gt_masks=torch.zeros(1, 3, 32, 32)), "gt_masks"),
        (lambda b: b.update(num_objects=torch.tensor([5])), "num_objects"),
        (lambda b: b.update(valid_mask=torch.ones(1, 8, 8, dtype=torch.bool)), "valid_mask"),
        (lambda b: b.update(image_embeddings=torch.zeros(1, 16, 16, 16)), "image_embeddings"),
        (lambda b: b.update(input_ids=b["input_ids"][0]), "input_ids"),
    ],
)
def test_bad_inputs_get_clear_errors(mutate, match):
    model = build_tiny_model()
    batch = make_batch(model.config, [1], with_targets=True)
    mutate(batch)
    with pytest.raises(ValueError, match=match):
        model(**batch)


def test_save_and_load_round_trip_is_bit_exact(tmp_path):
    model = build_tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = SegCompassForReasoningSegmentation.from_pretrained(tmp_path).eval()
    original = model.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    batch = make_batch(model.config, [2])
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch).mask_logits, loaded(**batch).mask_logits, rtol=0, atol=0
        )


def test_auto_classes_resolve(tmp_path):
    from transformers import AutoConfig, AutoModel

    model = build_tiny_model()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SegCompassConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), SegCompassForReasoningSegmentation)


def test_relu_threshold_mode_runs_and_respects_threshold():
    model = build_tiny_model(sae_architecture="relu", activation_threshold=0.05)
    batch = make_batch(model.config, [1])
    with torch.no_grad():
        out = model(**batch)
    active = out.concept_values[out.concept_values != 0]
    assert active.numel() > 0 and (active.abs() >= 0.05).all()


def test_slot_mapper_ref_dropout_zeroes_ref_states_in_training_only():
    """In training each (sample, slot) `<REF_POS>` state reaches the slot mapper as zeros with
    probability `slot_mapper_ref_dropout`; near 1 that is the no-REF-input model, and in eval
    the option changes nothing."""
    dropped = build_tiny_model(slot_mapper_ref_dropout=0.999999)
    batch = make_batch(dropped.config, [2, 2])
    without = build_tiny_model(slot_mapper_ref_input=False)
    plain = build_tiny_model()
    for model in (dropped, without, plain):
        model.config.codebook_dropout = 0.0
    with torch.no_grad():
        torch.manual_seed(1)
        train_dropped = dropped.train()(**batch).mask_logits
        train_without = without.train()(**batch).mask_logits
        eval_dropped = dropped.eval()(**batch).mask_logits
        eval_plain = plain.eval()(**batch).mask_logits
        eval_without = without.eval()(**batch).mask_logits
    torch.testing.assert_close(train_dropped, train_without)
    torch.testing.assert_close(eval_dropped, eval_plain)
    assert not torch.allclose(eval_plain, eval_without)  # the REF states do reach the mask
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="slot_mapper_ref_dropout"):
            build_tiny_model(slot_mapper_ref_dropout=bad)
