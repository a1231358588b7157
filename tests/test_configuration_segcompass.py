import pytest

from modeling_segcompass.configuration_segcompass import SegCompassConfig


def test_tiny_preset_dimensions():
    config = SegCompassConfig.tiny()
    assert config.model_type == "segcompass"
    assert config.vlm_config.model_type == "qwen2_5_vl"
    assert config.sam_config.model_type == "sam"
    assert config.llm_hidden_size == 64
    assert (config.image_embedding_size, config.mask_size, config.image_embedding_channels) == (
        16,
        64,
        32,
    )
    assert config.image_encoder_type == "conv"


@pytest.mark.parametrize(
    "vlm, hidden, layer",
    [("qwen2.5-vl-7b", 3584, 12), ("llava-1.5-7b", 4096, 15), ("llava-1.5-13b", 5120, 15)],
)
def test_paper_preset_has_published_dimensions(vlm, hidden, layer):
    config = SegCompassConfig.paper(vlm, num_slots=4)
    assert config.llm_hidden_size == hidden
    assert config.sae_layer == layer
    assert (config.d_sae, config.codebook_dim, config.codebook_layers, config.codebook_heads) == (
        65536, 512, 2, 8,
    )  # fmt: skip
    assert config.num_slots == 4
    assert config.mask_size == 256 and config.image_embedding_channels == 256
    assert config.sam_config.vision_config.hidden_size == 1280  # ViT-H


def test_round_trip_through_json(tmp_path):
    config = SegCompassConfig.tiny(num_slots=2, sae_architecture="relu", activation_threshold=2.0)
    config.save_pretrained(tmp_path)
    loaded = SegCompassConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.vlm_config.vision_config.patch_size == 8
    chunked = SegCompassConfig.tiny(max_images_per_decoder_call=3)
    chunked.save_pretrained(tmp_path / "chunked")
    assert SegCompassConfig.from_pretrained(tmp_path / "chunked").max_images_per_decoder_call == 3


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"sae_architecture": "gated"}, "sae_architecture"),
        ({"image_encoder_type": "resnet"}, "image_encoder_type"),
        ({"sae_layer": 2}, "sae_layer"),
        ({"sae_k": 0}, "sae_k"),
        ({"sae_k": 10_000}, "sae_k"),
        ({"codebook_dim": 66}, "codebook_dim"),
        ({"num_slots": 0}, "num_slots"),
        ({"slot_mapper_heads": 5}, "slot_mapper_heads"),
        ({"ref_token_id": 5000}, "ref_token_id"),
        ({"conf_loss_weight": -1.0}, "conf_loss_weight"),
        ({"activation_threshold": -0.5}, "activation_threshold"),
        ({"max_images_per_decoder_call": 0}, "max_images_per_decoder_call"),
        ({"max_images_per_decoder_call": 2.5}, "max_images_per_decoder_call"),
    ],
)
def test_validation_names_field_allowed_and_given(overrides, field):
    with pytest.raises(ValueError) as info:
        SegCompassConfig.tiny(**overrides)
    message = str(info.value)
    assert f"SegCompassConfig.{field}" in message
    assert "expected" in message and repr(next(iter(overrides.values()))) in message


def test_unknown_paper_backbone():
    with pytest.raises(ValueError, match="qwen2.5-vl-7b"):
        SegCompassConfig.paper("gpt-9")
