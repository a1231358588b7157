"""The authors' slot head, slot order and heatmap fill, against a re-implementation of their math.

The reference functions below were written here from reading `SlotAttnHeatmapHead` and
`VLRefSegCore` (verl/modeling.py of github.com/ZhenyuLU-Heliodore/SegCompass): plain tensor
operations on a dict of tensors keyed by the authors' `heatmap_head.*` names. The same random
tensors go into both; the max |diff| is printed (run with -s) and recorded in docs/model.md.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.sam_frame import valid_mask as frame_valid_mask
from modeling_segcompass.slot_mapper import UpstreamSlotMapper
from modeling_segcompass.vlm_states import fill_outside_image, gather_ref_hidden_states
from tests.helpers import REF, build_tiny_model, make_batch

D_LLM, D_Q, C, HEADS, E = 48, 24, 32, 4, 8


def upstream_shapes(d_llm: int, d_q: int, c: int, heads: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' head under `heatmap_head.` (refine=True)."""
    return {
        "q_proj.weight": (c, d_llm),
        "k_proj.weight": (c, c, 1, 1),
        "fuser.0.weight": (heads, heads, 3, 3),
        "fuser.0.bias": (heads,),
        "fuser.2.weight": (1, heads, 3, 3),
        "fuser.2.bias": (1,),
        "querybook_proj.weight": (d_llm, d_q),
        "ref_fuse.0.weight": (2 * d_llm,),
        "ref_fuse.0.bias": (2 * d_llm,),
        "ref_fuse.1.weight": (d_llm, 2 * d_llm),
        "ref_fuse.1.bias": (d_llm,),
        "conf_head.0.weight": (d_llm,),
        "conf_head.0.bias": (d_llm,),
        "conf_head.1.weight": (d_llm // 2, d_llm),
        "conf_head.1.bias": (d_llm // 2,),
        "conf_head.3.weight": (1, d_llm // 2),
        "conf_head.3.bias": (1,),
    }


def random_weights(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in upstream_shapes(D_LLM, D_Q, C, HEADS).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = 1.0 if len(shape) == 1 else fan_in**-0.5
        value = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        if name.endswith("0.weight") and len(shape) == 1:  # LayerNorm gains around 1
            value = 1.0 + 0.1 * value
        weights[name] = value.to(dtype)
    return weights


def reference_head(w, image, ref_vec, qb_slots, out_size):
    """The authors' head as a formula: (heatmap logits (B, K, S, S), confidence logits (B, K))."""
    batch, channels, height, width = image.shape
    k = ref_vec.shape[1]
    d_head = channels // HEADS

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def silu(x):
        return x * torch.sigmoid(x)

    qb = qb_slots @ w["querybook_proj.weight"].T  # (B, K, D)
    joined = torch.cat([ref_vec, qb], dim=-1)  # the <REF_POS> state first
    fused = silu(layer_norm(joined, "ref_fuse.0") @ w["ref_fuse.1.weight"].T + w["ref_fuse.1.bias"])
    query = (fused @ w["q_proj.weight"].T).reshape(batch, k, HEADS, d_head, 1, 1)
    key_map = torch.einsum("oc,bchw->bohw", w["k_proj.weight"][:, :, 0, 0], image)
    key_map = key_map.reshape(batch, 1, HEADS, d_head, height, width)
    per_head = (query * key_map).sum(dim=3) / math.sqrt(d_head)  # (B, K, heads, H, W)
    x = per_head.reshape(batch * k, HEADS, height, width)
    x = silu(F.conv2d(x, w["fuser.0.weight"], w["fuser.0.bias"], padding=1))
    x = F.conv2d(x, w["fuser.2.weight"], w["fuser.2.bias"], padding=1)
    x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)
    heat = x.reshape(batch, k, out_size, out_size)
    h = layer_norm(fused, "conf_head.0")
    h = silu(h @ w["conf_head.1.weight"].T + w["conf_head.1.bias"])
    conf = (h @ w["conf_head.3.weight"].T + w["conf_head.3.bias"]).squeeze(-1)
    return heat, conf


def reference_ref_vec(hidden, input_ids, ref_id, k):
    """The authors' slot order: slot 0 is the last <REF_POS>, then backwards; zeros after."""
    out = torch.zeros(hidden.shape[0], k, hidden.shape[-1], dtype=hidden.dtype)
    for b in range(hidden.shape[0]):
        positions = [t for t in range(input_ids.shape[1]) if int(input_ids[b, t]) == ref_id]
        for slot, t in enumerate(reversed(positions[-k:])):
            out[b, slot] = hidden[b, t]
    return out


def reference_fill(logits, unpadded_hw, value=-50.0):
    """The authors' fill: rows >= ceil(h / 4) or columns >= ceil(w / 4) of the grid get `value`."""
    out = logits.clone()
    for b, (h, w) in enumerate(unpadded_hw):
        rows, cols = min((h + 3) // 4, out.shape[-2]), min((w + 3) // 4, out.shape[-1])
        out[b, :, rows:, :] = value
        out[b, :, :, cols:] = value
    return out


def test_parameters_map_one_to_one_onto_the_authors_head():
    mapper = UpstreamSlotMapper(codebook_dim=D_Q, llm_hidden_size=D_LLM, image_channels=C)
    ours = {name: tuple(p.shape) for name, p in mapper.state_dict().items()}
    assert ours == upstream_shapes(D_LLM, D_Q, C, HEADS)
    assert float(mapper.fuser[-1].bias.detach()) == pytest.approx(-1.8)
    with torch.device("meta"):  # the paper's dims: Qwen2.5-VL-7B width, codebook 512, SAM 256
        big = UpstreamSlotMapper(codebook_dim=512, llm_hidden_size=3584, image_channels=256)
    count = sum(p.numel() for p in big.parameters())
    print(f"\nupstream slot mapper at paper dims: {count / 1e6:.2f}M parameters")
    assert round(count / 1e6, 1) == 35.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_heatmaps_and_confidences_equal_the_authors_math(dtype):
    weights = random_weights(seed=3, dtype=dtype)
    mapper = UpstreamSlotMapper(codebook_dim=D_Q, llm_hidden_size=D_LLM, image_channels=C)
    mapper = mapper.to(dtype).eval()
    mapper.load_state_dict(weights, strict=True)
    gen = torch.Generator().manual_seed(4)
    image = torch.randn(2, C, E, E, generator=gen, dtype=torch.float64).to(dtype)
    refs = torch.randn(2, 3, D_LLM, generator=gen, dtype=torch.float64).to(dtype)
    refs[1, 2] = 0.0  # a missing <REF_POS>: zeros, as both gather them
    slots = torch.randn(2, 3, D_Q, generator=gen, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        out = mapper(slots, refs, image)
        heat, conf = reference_head(weights, image, refs, slots, out_size=4 * E)
    heat_diff = (out.heatmap_logits - heat).abs().max().item()
    conf_diff = (out.conf_logits - conf).abs().max().item()
    print(f"\n{dtype}: heatmap max|diff| {heat_diff:.2e}, confidence max|diff| {conf_diff:.2e}")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert heat_diff <= tol and conf_diff <= tol
    assert out.heatmap_logits.shape == (2, 3, 4 * E, 4 * E) and out.conf_logits.shape == (2, 3)


def test_last_first_order_puts_the_last_ref_in_slot_zero():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, 5, generator=gen)
    ids = torch.tensor([
        [1, REF, 2, REF, REF, REF, 3, 0, 0],  # 4 refs, K=3: the last three, backwards
        [1, 2, REF, 3, 0, 0, 0, 0, 0],  # 1 ref: slot 0 only
        [REF, 2, REF, 3, 0, 0, 0, 0, 0],  # 2 refs
    ])  # fmt: skip
    states, present = gather_ref_hidden_states(hidden, ids, REF, 3, "last_first")
    expected = reference_ref_vec(hidden, ids, REF, 3)
    print(f"\nslot order max|diff| {(states - expected).abs().max().item():.1e}")
    torch.testing.assert_close(states, expected, rtol=0, atol=0)
    torch.testing.assert_close(states[0], hidden[0, [5, 4, 3]])
    assert present.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    reading, _ = gather_ref_hidden_states(hidden, ids, REF, 3)
    torch.testing.assert_close(reading[0], hidden[0, [3, 4, 5]])
    torch.testing.assert_close(reading[2, :2], states[2, :2].flip(0))
    with pytest.raises(ValueError, match="order"):
        gather_ref_hidden_states(hidden, ids, REF, 3, "backwards")


def test_fill_outside_the_image_equals_the_authors_on_the_processors_valid_mask():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, 256, 256, generator=gen)
    sizes = [(1024, 683), (771, 1024), (1024, 1024)]  # (h, w) of the resized image in 1024
    valid = torch.stack([frame_valid_mask(s, 256, 1024) for s in sizes])
    filled = fill_outside_image(logits, valid, -50.0)
    expected = reference_fill(logits, sizes)
    print(f"\nfill max|diff| {(filled - expected).abs().max().item():.1e}")
    torch.testing.assert_close(filled, expected, rtol=0, atol=0)
    assert fill_outside_image(logits, None, -50.0) is logits
    assert fill_outside_image(logits, valid, None) is logits


def test_upstream_config_takes_the_authors_choices():
    config = SegCompassConfig.upstream()
    assert (config.slot_mapper_type, config.slot_mapper_heads, config.slot_order) == (
        "upstream", 4, "last_first",
    )  # fmt: skip
    assert config.heatmap_outside_fill == -50.0 and config.num_slots == 4
    assert (config.sae_architecture, config.sae_apply_b_dec_to_input) == ("relu", False)
    assert config.activation_threshold == 2.0 and config.sae_layer == 12
    assert (config.codebook_dim, config.codebook_layers, config.codebook_heads) == (512, 2, 8)
    assert (config.seg_loss_weight, config.conf_loss_weight) == (0.3, 0.2)
    assert (config.mask_dice_weight, config.heatmap_dice_weight) == (0.8, 0.8)
    assert (config.mask_focal_weight, config.iou_loss_weight) == (0.0, 0.0)
    assert (config.loss_schedule_step, config.mask_dice_weight_after) == (1500, 2.0)
    assert (config.heatmap_dice_weight_after, config.mask_focal_weight_after) == (2.0, 5.0)
    assert (config.matching_on, config.matching_cost, config.matching_full_grid) == (
        "heatmap", "soft_iou", True,
    )  # fmt: skip
    assert config.loss_normalization == "per_sample"
    assert SegCompassConfig.upstream("llava-1.5-13b").sae_layer == 15
    assert SegCompassConfig.upstream(num_slots=2, slot_order="reading").slot_order == "reading"
    with pytest.raises(ValueError, match="unknown vlm"):
        SegCompassConfig.upstream("qwen2-vl-2b")
    for field, bad in (("slot_mapper_type", "lisa"), ("slot_order", "random"),
                       ("heatmap_outside_fill", float("nan"))):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            SegCompassConfig.tiny(**{field: bad})


UPSTREAM_TINY = {
    "slot_mapper_type": "upstream",
    "slot_order": "last_first",
    "heatmap_outside_fill": -50.0,
}


def test_forward_with_the_upstream_head_fills_only_sams_prompt(tmp_path):
    model = build_tiny_model(**UPSTREAM_TINY)
    assert isinstance(model.slot_mapper, UpstreamSlotMapper)
    # the model's init keeps the fuser's starting bias; its names are the authors' keys
    assert model.slot_mapper.fuser[-1].bias.detach().tolist() == pytest.approx([-1.8])
    names = {k.removeprefix("slot_mapper.") for k in model.state_dict() if k.startswith("slot_")}
    assert names == set(upstream_shapes(1, 1, 1, 1))
    batch = make_batch(model.config, [3, 2], with_targets=True)
    with torch.no_grad():
        out = model(**batch)
        filled = fill_outside_image(out.heatmap_logits, batch["valid_mask"], -50.0)
        masks, iou = model.decode_masks(filled, out.image_embeddings)
        unfilled, _ = model.decode_masks(out.heatmap_logits, out.image_embeddings)
    torch.testing.assert_close(out.mask_logits, masks)
    torch.testing.assert_close(out.iou_scores, iou)
    assert not torch.allclose(out.mask_logits, unfilled)  # the fill reached SAM
    assert (
        out.heatmap_logits[~batch["valid_mask"].unsqueeze(1).expand_as(out.heatmap_logits)]
        .gt(-50.0)
        .all()
    )  # the returned heatmaps (and their losses) are not filled
    assert torch.isfinite(out.loss)
    # the last <REF_POS> feeds slot 0
    ids = batch["input_ids"]
    last = (ids[0] == REF).nonzero().max()
    with torch.no_grad():
        hidden = model.vlm.model(
            input_ids=ids, attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
        ).last_hidden_state  # fmt: skip
    torch.testing.assert_close(out.ref_hidden_states[0, 0], hidden[0, last])
    # saved and loaded, the head and the outputs are the same
    model.save_pretrained(tmp_path)
    loaded = SegCompassForReasoningSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.slot_mapper, UpstreamSlotMapper)
    with torch.no_grad():
        again = loaded(**batch)
    torch.testing.assert_close(again.mask_logits, out.mask_logits)
    torch.testing.assert_close(again.conf_logits, out.conf_logits)
