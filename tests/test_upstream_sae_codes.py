"""upstream(): the SAE codes the codebook reads equal the authors' (relu SAE, no `b_dec`
subtracted from the input, |a| < 2.0 zeroed by the query book), written here from reading
verl/modeling.py of github.com/ZhenyuLU-Heliodore/SegCompass."""

from __future__ import annotations

import torch

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from tests.helpers import build_tiny_config


def authors_codes(x, W_enc, b_enc, threshold):
    """Their SAE encode (relu of x W_enc + b_enc, the input used as it is), then the query
    book's zeroing of small activations."""
    acts = torch.relu(x @ W_enc + b_enc)
    return torch.where(acts.abs() < threshold, torch.zeros_like(acts), acts)


def test_upstream_preset_sae_codes_equal_the_authors():
    tiny = build_tiny_config()
    config = SegCompassConfig.upstream(
        "qwen2.5-vl-7b",
        num_slots=3,
        vlm_config=tiny.vlm_config.to_dict(),
        sam_config=tiny.sam_config.to_dict(),
        image_encoder_type="conv",
        sae_layer=0,
        d_sae=256,
        codebook_dim=32,
        codebook_heads=4,
        codebook_ffn_dim=64,
        ref_token_id=9,
        think_start_token_id=7,
        think_end_token_id=8,
    )
    assert (config.sae_architecture, config.sae_apply_b_dec_to_input) == ("relu", False)
    assert config.activation_threshold == 2.0
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(config).double().eval()
    sae = model.sae
    with torch.no_grad():
        sae.b_dec.normal_(std=3.0)  # a trained b_dec: subtracting it would change the codes
        sae.b_enc.normal_()
        x = torch.randn(5, 7, config.vlm_text_config.hidden_size, dtype=torch.float64) * 4
        ours = sae.encode_dense(x)
        theirs = authors_codes(x, sae.W_enc, sae.b_enc, config.activation_threshold)
    assert (theirs != 0).any() and (theirs == 0).any()
    diff = float((ours - theirs).abs().max())
    assert diff == 0.0, diff
