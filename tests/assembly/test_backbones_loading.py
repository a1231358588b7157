"""from_backbones: assemble SegCompass from tiny checkpoints saved in the real formats.

The checkpoints are written exactly as the real ones are: `save_pretrained` of a tiny
Qwen2.5-VL with a Qwen-style tokenizer that lacks `<think>`, `</think>`, `<REF_POS>` (as the
real Qwen2.5-VL tokenizer does) and a Qwen2-VL image-processor config; `save_pretrained` of
a tiny `SamModel` (`facebook/sam-vit-*` names); an SAE folder in SAELens format.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2TokenizerFast,
    SamConfig,
    SamModel,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.assembly.backbones import (
    AssembledSegCompass,
    assemble_from_backbones,
    sam_state_dict_to_segcompass,
)
from modeling_segcompass.assembly.tokenizer_builder import CHAT_TEMPLATE, CONTROL_TOKENS
from modeling_segcompass.sparse_autoencoder import SparseAutoencoder

HEADS = {"codebook_dim": 32, "codebook_heads": 4, "codebook_ffn_dim": 64, "slot_mapper_heads": 4}


def qwen_like_tokenizer() -> Qwen2TokenizerFast:
    """Byte-level BPE with Qwen2.5-VL's control tokens (ids 0..6) and no SegCompass tokens."""
    bpe = Tokenizer(BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=300,
        special_tokens=list(CONTROL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["the red circle left of the blue square"] * 5, trainer=trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        unk_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens(
        {
            "extra_special_tokens": [
                AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS[1:]
            ]
        }
    )
    return tokenizer


def tiny_sam_config() -> SamConfig:
    """SAM at 64 px, patch 8: an 8x8 image embedding of width 32, masks 32x32."""
    return SamConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_dim": 64,
            "image_size": 64,
            "patch_size": 8,
            "output_channels": 32,
            "global_attn_indexes": [1],
            "window_size": 4,
            "num_pos_feats": 16,
        },
        prompt_encoder_config={
            "hidden_size": 32,
            "image_size": 64,
            "patch_size": 8,
            "mask_input_channels": 8,
            "image_embedding_size": 8,
        },
        mask_decoder_config={
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    tokenizer = qwen_like_tokenizer()
    torch.manual_seed(0)
    vlm_config = SegCompassConfig.tiny(vocab_size=len(tokenizer)).vlm_config
    Qwen2_5_VLForConditionalGeneration(vlm_config).save_pretrained(root / "vlm")
    tokenizer.save_pretrained(root / "vlm")
    Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=256, max_pixels=64 * 64
    ).save_pretrained(root / "vlm")
    SamModel(tiny_sam_config()).save_pretrained(root / "sam")
    sae = SparseAutoencoder(d_in=64, d_sae=128, architecture="topk", k=8)
    with torch.no_grad():
        sae.b_enc.normal_()  # not the init value, so that a fresh SAE cannot pass for it
    sae.save(root / "sae", hook_layer=1)
    SparseAutoencoder(d_in=48, d_sae=128, architecture="topk", k=8).save(root / "sae48")
    return {name: root / name for name in ("vlm", "sam", "sae", "sae48")} | {
        "vocab": len(tokenizer)
    }


@pytest.fixture(scope="module")
def assembled(checkpoints) -> AssembledSegCompass:
    return assemble_from_backbones(
        checkpoints["vlm"], checkpoints["sam"], checkpoints["sae"], num_slots=2, **HEADS
    )


def test_vlm_weights_equal_the_checkpoint_and_new_tokens_get_rows(checkpoints, assembled):
    model, processor = assembled
    tokenizer = processor.tokenizer
    assert assembled.added_tokens == ["<think>", "</think>", "<REF_POS>"]
    vocab = checkpoints["vocab"]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in assembled.added_tokens]
    assert ids == [vocab, vocab + 1, vocab + 2]  # appended after the checkpoint's vocabulary
    assert model.config.ref_token_id == ids[2]
    assert (model.config.think_start_token_id, model.config.think_end_token_id) == tuple(ids[:2])
    # the answer tokens are single, non-special tokens (TRL decodes with skip_special_tokens)
    text = "<think> red </think> <REF_POS>"
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded.count(ids[2]) == 1 and encoded.count(ids[0]) == 1
    assert tokenizer.decode(encoded, skip_special_tokens=True) == text

    # the checkpoint as transformers itself loads it (saved names differ from module names)
    stored = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoints["vlm"]).state_dict()
    state = model.vlm.state_dict()
    assert state.keys() == stored.keys()
    embed_key = next(k for k in stored if k.endswith("embed_tokens.weight"))
    for key, tensor in stored.items():
        if tensor.data_ptr() == stored[embed_key].data_ptr():
            continue  # embeddings and the LM head tied to them: compared below
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape == (vocab + 3, 64)
    assert model.config.vlm_text_config.vocab_size == vocab + 3
    torch.testing.assert_close(embeddings[:vocab], stored[embed_key], rtol=0, atol=0)
    assert torch.isfinite(embeddings[vocab:]).all() and embeddings[vocab:].abs().sum() > 0
    # the tiny Qwen ties its LM head to the embeddings; the resize keeps the tie
    assert model.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()


def test_sam_weights_map_onto_segcompass_names(checkpoints, assembled):
    model = assembled.model
    stored = load_file(checkpoints["sam"] / "model.safetensors")
    mapped = sam_state_dict_to_segcompass(stored)
    state = model.state_dict()
    assert len(mapped) == len(stored)
    for key, tensor in mapped.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)
    assert "image_encoder.patch_embed.projection.weight" in mapped
    torch.testing.assert_close(
        state["prompt_encoder.shared_embedding.positional_embedding"],
        stored["shared_image_embedding.positional_embedding"],
        rtol=0,
        atol=0,
    )
    assert model.config.image_encoder_type == "sam"
    assert (model.config.image_embedding_size, model.config.mask_size) == (8, 32)
    # SAM parts unused by dense prompts stay frozen, as in a model built from its config
    assert not model.prompt_encoder.no_mask_embed.weight.requires_grad
    assert model.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.requires_grad


def test_sam_state_dict_mapping_refuses_foreign_keys():
    with pytest.raises(ValueError, match="SamModel state dict"):
        sam_state_dict_to_segcompass({"model.layers.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="positional_embedding"):
        sam_state_dict_to_segcompass({"mask_decoder.iou_token.weight": torch.zeros(1, 2)})


def test_image_embedding_and_mask_decoder_match_sam_itself(checkpoints, assembled):
    model = assembled.model
    sam = SamModel.from_pretrained(checkpoints["sam"]).eval()
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        ours = model.encode_image(pixels)
        theirs = sam.get_image_embeddings(pixels)
        torch.testing.assert_close(ours, theirs)
        heatmaps = torch.randn(2, 3, 32, 32, generator=generator)  # (B, K, M, M) dense prompts
        masks, iou = model.decode_masks(heatmaps, theirs)
        _, dense = sam.prompt_encoder(None, None, None, input_masks=heatmaps.reshape(6, 1, 32, 32))
        ref_masks, ref_iou = sam.mask_decoder(
            image_embeddings=theirs.repeat_interleave(3, dim=0),
            image_positional_embeddings=sam.get_image_wide_positional_embeddings().expand(
                6, -1, -1, -1
            ),
            sparse_prompt_embeddings=None,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
    torch.testing.assert_close(masks, ref_masks.reshape(2, 3, 32, 32))
    torch.testing.assert_close(iou, ref_iou.reshape(2, 3))
    assert masks.abs().sum() > 0


def test_sae_is_loaded_and_sets_the_config(checkpoints, assembled):
    model = assembled.model
    stored = load_file(checkpoints["sae"] / "sae_weights.safetensors")
    for key, tensor in stored.items():
        torch.testing.assert_close(getattr(model.sae, key), tensor, rtol=0, atol=0, msg=key)
    config = model.config
    assert (config.d_sae, config.sae_architecture, config.sae_k) == (128, "topk", 8)
    assert config.sae_layer == 1  # the SAELens hook_layer of the SAE
    assert assembled.sources["sae"] == str(checkpoints["sae"])


def test_fresh_heads_are_initialised_like_a_model_built_from_config(assembled):
    model = assembled.model
    assert not any(p.is_meta for p in model.parameters())
    reference = SegCompassForReasoningSegmentation(model.config)
    for name in ("codebook", "slot_mapper"):
        ours = dict(getattr(model, name).named_parameters())
        theirs = dict(getattr(reference, name).named_parameters())
        assert ours.keys() == theirs.keys()
        for key in ours:
            a, b = ours[key].detach(), theirs[key].detach()
            assert torch.isfinite(a).all(), key
            # same init rule: equal constants (norm weights, zero biases) or a similar spread
            if b.numel() == 1:
                continue  # a single random value (e.g. a 1-channel conv bias): nothing to compare
            if (b == b.flatten()[0]).all():
                torch.testing.assert_close(a, b, msg=f"{name}.{key}")
            else:
                assert not (a == a.flatten()[0]).all(), key
                bound = 3.0 if b.numel() >= 64 else 10.0
                assert 1 / bound < float(a.std() / b.std()) < bound, key


def test_assembled_model_trains_and_round_trips_through_save_pretrained(tmp_path, assembled):
    model, processor = assembled
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((1, 48, 64), dtype=np.uint8)
    mask[0, 10:30, 5:40] = 1
    batch = processor(
        image, "the red circle", responses="<think> red </think> <REF_POS> <REF_POS>", masks=[mask]
    )
    for key in ("original_sizes", "reshaped_input_sizes"):
        batch.pop(key)
    assert (batch["input_ids"] == model.config.ref_token_id).sum() == 2
    model.train()
    out = model(**batch)
    assert out.mask_logits.shape == (1, 2, 32, 32) and out.ref_mask.all()
    out.loss.backward()
    assert model.codebook.codebook.grad.abs().sum() > 0
    assert model.mask_decoder.iou_token.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = SegCompassForReasoningSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected, got = model(**batch), reloaded(**batch)
    torch.testing.assert_close(got.mask_logits, expected.mask_logits)
    torch.testing.assert_close(got.logits, expected.logits)


def test_fresh_sae_without_checkpoint_and_overrides(checkpoints):
    model, processor = assemble_from_backbones(
        checkpoints["vlm"], checkpoints["sam"], d_sae=64, sae_k=4, sae_layer=0, **HEADS
    )
    assert (model.config.d_sae, model.config.sae_k, model.config.sae_layer) == (64, 4, 0)
    assert model.config.num_slots == 1 and processor.num_slots == 1
    assert model.sae.W_enc.shape == (64, 64)
    # SAELens init: W_enc = W_dec^T with unit-norm decoder rows
    torch.testing.assert_close(model.sae.W_enc.detach(), model.sae.W_dec.detach().T)
    norms = model.sae.W_dec.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_sae_width_mismatch_is_a_clear_error(checkpoints):
    with pytest.raises(ValueError, match=r"d_in=48 .* hidden size is 64"):
        assemble_from_backbones(checkpoints["vlm"], checkpoints["sam"], checkpoints["sae48"])


def test_override_contradicting_the_sae_is_refused(checkpoints):
    with pytest.raises(ValueError, match="d_sae=256 contradicts the SAE"):
        assemble_from_backbones(
            checkpoints["vlm"], checkpoints["sam"], checkpoints["sae"], d_sae=256, **HEADS
        )


def test_unreachable_checkpoint_names_the_part(checkpoints, tmp_path):
    with pytest.raises(OSError, match="could not load the VLM from 'no-such-org/no-such-vlm'"):
        assemble_from_backbones("no-such-org/no-such-vlm", checkpoints["sam"])
    with pytest.raises(OSError, match="could not load the SAM checkpoint"):
        assemble_from_backbones(checkpoints["vlm"], tmp_path / "missing-sam")
    with pytest.raises(ValueError, match="`sam` must be"):
        assemble_from_backbones(checkpoints["vlm"], 3)


def test_from_backbones_classmethod_delegates(checkpoints):
    model, processor = SegCompassForReasoningSegmentation.from_backbones(
        vlm=checkpoints["vlm"], sam=checkpoints["sam"], sae=checkpoints["sae"], **HEADS
    )
    assert isinstance(model, SegCompassForReasoningSegmentation)
    assert model.config.d_sae == 128 and processor.ref_token_id == model.config.ref_token_id
