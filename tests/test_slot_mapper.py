import pytest
import torch

from modeling_segcompass.slot_mapper import SlotMapper


def build():
    return SlotMapper(codebook_dim=16, llm_hidden_size=24, image_channels=32, num_heads=4,
                      fuser_channels=8).eval()  # fmt: skip


def test_heatmap_is_upsampled_fuser_output_of_per_head_similarity():
    mapper = build()
    slots, refs, image = torch.randn(2, 3, 16), torch.randn(2, 3, 24), torch.randn(2, 32, 8, 8)
    out = mapper(slots, refs, image)
    assert out.heatmap_logits.shape == (2, 3, 32, 32) and out.conf_logits.shape == (2, 3)
    # recompute one slot's similarity by hand
    q = mapper.query_proj(out.queries)[1, 2].view(4, 8)
    k = mapper.key_proj(image)[1].view(4, 8, 64)
    expected = torch.einsum("hc,hcn->hn", q, k).view(4, 8, 8) / 8**0.5
    torch.testing.assert_close(out.similarity[1, 2], expected)


def test_slots_are_independent_and_ref_state_matters():
    mapper = build()
    slots, refs, image = torch.randn(1, 2, 16), torch.randn(1, 2, 24), torch.randn(1, 32, 8, 8)
    out = mapper(slots, refs, image)
    refs2 = refs.clone()
    refs2[0, 1] += 1.0
    out2 = mapper(slots, refs2, image)
    torch.testing.assert_close(out.heatmap_logits[0, 0], out2.heatmap_logits[0, 0])
    assert not torch.allclose(out.heatmap_logits[0, 1], out2.heatmap_logits[0, 1])


def test_errors_name_the_argument():
    mapper = build()
    with pytest.raises(ValueError, match="ref_hidden_states"):
        mapper(torch.randn(1, 2, 16), torch.randn(1, 3, 24), torch.randn(1, 32, 8, 8))
    with pytest.raises(ValueError, match="image_embeddings"):
        mapper(torch.randn(1, 2, 16), torch.randn(1, 2, 24), torch.randn(32, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        SlotMapper(codebook_dim=16, llm_hidden_size=24, image_channels=30, num_heads=4)
