"""Upstream SegCompass checkpoints convert into this package's model, number for number.

The upstream side is re-implemented here at tiny dims from reading the authors' code
(github.com/ZhenyuLU-Heliodore/SegCompass, verl/modeling.py: QueryBookAttnHead,
SlotAttnHeatmapHead) and segment_anything's module layout: same parameter names and shapes,
written with torch.save as plain tensor dicts, as upstream's checkpoint manager writes
`refseg_modules.pt`. The converted model must give the same numbers as these modules.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AddedToken, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from modeling_segcompass import (
    SegCompassConfig,
    SegCompassForReasoningSegmentation,
    convert_upstream_checkpoint,
    convert_upstream_state_dict,
)
from modeling_segcompass.assembly.upstream import load_tensor_dict
from tests.assembly.test_backbones_loading import qwen_like_tokenizer
from tests.helpers import HIDE_PACKAGE, make_batch

# tiny dims: SAE 32 latents, codebook 16 wide, K = 2, SAM width 32 on an 8 x 8 grid
D_SAE, D_Q, K, C, E = 32, 16, 2, 32, 8
VIT, VIT_DEPTH, VIT_HEAD, PATCH, WINDOW, MLP = 32, 2, 16, 8, 4, 64
MASK_CHANS, PE_FEATS, DEC_MLP, MASK_TOKENS = 16, 16, 64, 4


# ---------------------------------------------------------------- upstream, re-implemented
class RefQueryBook(nn.Module):
    """Upstream's query book: threshold, bias-free codebook, slots prepended, pre-norm encoder."""

    def __init__(self, d_sae: int, d_q: int, k: int, heads: int, ffn: int, layers: int) -> None:
        super().__init__()
        self.threshold = 2.0
        self.k = k
        self.codebook = nn.Linear(d_sae, d_q, bias=False)
        layer = nn.TransformerEncoderLayer(
            d_q, heads, ffn, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(d_q)
        self.slot_queries = nn.Parameter(torch.randn(1, k, d_q) * 0.02)

    def forward(self, codes: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        codes = codes.masked_fill(codes.abs() < self.threshold, 0.0)
        tokens = self.codebook(codes)  # (B, L, d_q)
        batch = tokens.shape[0]
        x = torch.cat([self.slot_queries.expand(batch, -1, -1), tokens], dim=1)
        pad = torch.cat([torch.zeros(batch, self.k, dtype=torch.bool), attention_mask == 0], dim=1)
        x = self.encoder(x, src_key_padding_mask=pad)
        return self.final_norm(x[:, : self.k])  # (B, K, d_q)


class RefHeatmapHead(nn.Module):
    """Upstream's slot head: fuse in the LLM width, per-head dot products, two-conv fuser."""

    def __init__(self, llm_dim: int, d_q: int, channels: int, heads: int) -> None:
        super().__init__()
        self.heads, self.d_head = heads, channels // heads
        self.q_proj = nn.Linear(llm_dim, channels, bias=False)
        self.k_proj = nn.Conv2d(channels, channels, 1, bias=False)
        self.fuser = nn.Sequential(
            nn.Conv2d(heads, heads, 3, padding=1), nn.SiLU(), nn.Conv2d(heads, 1, 3, padding=1)
        )
        self.querybook_proj = nn.Linear(d_q, llm_dim, bias=False)
        self.ref_fuse = nn.Sequential(
            nn.LayerNorm(2 * llm_dim), nn.Linear(2 * llm_dim, llm_dim), nn.SiLU()
        )
        self.conf_head = nn.Sequential(
            nn.LayerNorm(llm_dim),
            nn.Linear(llm_dim, llm_dim // 2),
            nn.SiLU(),
            nn.Linear(llm_dim // 2, 1),
        )

    def forward(self, image: torch.Tensor, ref: torch.Tensor, slots: torch.Tensor):
        b, _, h, w = image.shape
        k = ref.shape[1]
        fused = self.ref_fuse(torch.cat([ref, self.querybook_proj(slots)], dim=-1))
        q = self.q_proj(fused).reshape(b, k, self.heads, self.d_head, 1, 1)
        keys = self.k_proj(image).reshape(b, 1, self.heads, self.d_head, h, w)
        logits = (q * keys).sum(3) / math.sqrt(self.d_head)  # (B, K, heads, h, w)
        maps = self.fuser(logits.reshape(b * k, self.heads, h, w))
        maps = F.interpolate(maps, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
        return maps.reshape(b, k, 4 * h, 4 * w), self.conf_head(fused).squeeze(-1)


def randomise(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def segment_anything_shapes(*, image_encoder: bool) -> dict[str, tuple[int, ...]]:
    """segment_anything's parameter names and shapes at the tiny dims (ImageEncoderViT,
    PromptEncoder, MaskDecoder with TwoWayTransformer, as the SAM repository builds them)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if image_encoder:
        grid = E
        shapes["image_encoder.pos_embed"] = (1, grid, grid, VIT)
        shapes["image_encoder.patch_embed.proj.weight"] = (VIT, 3, PATCH, PATCH)
        shapes["image_encoder.patch_embed.proj.bias"] = (VIT,)
        for i in range(VIT_DEPTH):
            side = grid if i == VIT_DEPTH - 1 else WINDOW  # the last block is global
            b = f"image_encoder.blocks.{i}."
            for norm in ("norm1", "norm2"):
                shapes[b + norm + ".weight"] = shapes[b + norm + ".bias"] = (VIT,)
            shapes[b + "attn.qkv.weight"], shapes[b + "attn.qkv.bias"] = (3 * VIT, VIT), (3 * VIT,)
            shapes[b + "attn.proj.weight"], shapes[b + "attn.proj.bias"] = (VIT, VIT), (VIT,)
            shapes[b + "attn.rel_pos_h"] = shapes[b + "attn.rel_pos_w"] = (2 * side - 1, VIT_HEAD)
            shapes[b + "mlp.lin1.weight"], shapes[b + "mlp.lin1.bias"] = (MLP, VIT), (MLP,)
            shapes[b + "mlp.lin2.weight"], shapes[b + "mlp.lin2.bias"] = (VIT, MLP), (VIT,)
        shapes["image_encoder.neck.0.weight"] = (C, VIT, 1, 1)
        shapes["image_encoder.neck.1.weight"] = shapes["image_encoder.neck.1.bias"] = (C,)
        shapes["image_encoder.neck.2.weight"] = (C, C, 3, 3)
        shapes["image_encoder.neck.3.weight"] = shapes["image_encoder.neck.3.bias"] = (C,)
    p = "prompt_encoder."
    shapes[p + "pe_layer.positional_encoding_gaussian_matrix"] = (2, PE_FEATS)
    for i in range(4):
        shapes[f"{p}point_embeddings.{i}.weight"] = (1, C)
    shapes[p + "not_a_point_embed.weight"] = shapes[p + "no_mask_embed.weight"] = (1, C)
    quarter = MASK_CHANS // 4
    for index, (w, bias) in {
        0: ((quarter, 1, 2, 2), (quarter,)),
        1: ((quarter,), (quarter,)),
        3: ((MASK_CHANS, quarter, 2, 2), (MASK_CHANS,)),
        4: ((MASK_CHANS,), (MASK_CHANS,)),
        6: ((C, MASK_CHANS, 1, 1), (C,)),
    }.items():
        shapes[f"{p}mask_downscaling.{index}.weight"] = w
        shapes[f"{p}mask_downscaling.{index}.bias"] = bias
    d = "mask_decoder."
    shapes[d + "iou_token.weight"], shapes[d + "mask_tokens.weight"] = (1, C), (MASK_TOKENS, C)

    def attention(prefix: str, inner: int) -> None:
        for name in ("q_proj", "k_proj", "v_proj"):
            shapes[f"{prefix}.{name}.weight"], shapes[f"{prefix}.{name}.bias"] = (
                (inner, C),
                (inner,),
            )
        shapes[f"{prefix}.out_proj.weight"], shapes[f"{prefix}.out_proj.bias"] = (C, inner), (C,)

    for i in range(2):
        layer = f"{d}transformer.layers.{i}."
        attention(layer + "self_attn", C)
        attention(layer + "cross_attn_token_to_image", C // 2)
        attention(layer + "cross_attn_image_to_token", C // 2)
        for n in range(1, 5):
            shapes[f"{layer}norm{n}.weight"] = shapes[f"{layer}norm{n}.bias"] = (C,)
        shapes[layer + "mlp.lin1.weight"], shapes[layer + "mlp.lin1.bias"] = (
            (DEC_MLP, C),
            (DEC_MLP,),
        )
        shapes[layer + "mlp.lin2.weight"], shapes[layer + "mlp.lin2.bias"] = (C, DEC_MLP), (C,)
    attention(d + "transformer.final_attn_token_to_image", C // 2)
    shapes[d + "transformer.norm_final_attn.weight"] = (C,)
    shapes[d + "transformer.norm_final_attn.bias"] = (C,)
    shapes[d + "output_upscaling.0.weight"] = (C, C // 4, 2, 2)
    shapes[d + "output_upscaling.0.bias"] = (C // 4,)
    shapes[d + "output_upscaling.1.weight"] = shapes[d + "output_upscaling.1.bias"] = (C // 4,)
    shapes[d + "output_upscaling.3.weight"] = (C // 4, C // 8, 2, 2)
    shapes[d + "output_upscaling.3.bias"] = (C // 8,)
    mlps = {f"output_hypernetworks_mlps.{j}": C // 8 for j in range(MASK_TOKENS)}
    mlps["iou_prediction_head"] = MASK_TOKENS
    for name, out in mlps.items():
        for j, (rows, cols) in enumerate([(C, C), (C, C), (out, C)]):
            shapes[f"{d}{name}.layers.{j}.weight"] = (rows, cols)
            shapes[f"{d}{name}.layers.{j}.bias"] = (rows,)
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.2 for k, s in shapes.items()}


def upstream_modules(llm_dim: int = 64) -> tuple[RefQueryBook, RefHeatmapHead]:
    book = randomise(RefQueryBook(D_SAE, D_Q, K, heads=2, ffn=32, layers=2), 1).eval()
    head = randomise(RefHeatmapHead(llm_dim, D_Q, C, heads=4), 2).eval()
    return book, head


def refseg_state_dict(book: nn.Module, head: nn.Module) -> dict[str, torch.Tensor]:
    """What upstream's checkpoint manager writes to refseg_modules.pt (rank 0)."""
    gen = torch.Generator().manual_seed(3)
    state = {
        "sae.W_enc": torch.randn(64, D_SAE, generator=gen) * 0.3,
        "sae.b_enc": torch.randn(D_SAE, generator=gen) * 0.1,
        "sae.W_dec": torch.randn(D_SAE, 64, generator=gen) * 0.3,
        "sae.b_dec": torch.randn(64, generator=gen) * 0.1,
    }
    state.update({f"query_book.{k}": v for k, v in book.state_dict().items()})
    state.update({f"heatmap_head.{k}": v for k, v in head.state_dict().items()})
    state.update(random_tensors(segment_anything_shapes(image_encoder=False), seed=4))
    return {k: v.detach().clone() for k, v in state.items()}


def tiny_sam() -> dict:
    return {
        "vision_config": {
            "hidden_size": VIT, "num_hidden_layers": VIT_DEPTH, "num_attention_heads": 2,
            "mlp_dim": MLP, "image_size": E * PATCH, "patch_size": PATCH, "output_channels": C,
            "global_attn_indexes": [VIT_DEPTH - 1], "window_size": WINDOW,
            "num_pos_feats": PE_FEATS,
        },
        "prompt_encoder_config": {
            "hidden_size": C, "image_size": E * PATCH, "patch_size": PATCH,
            "mask_input_channels": MASK_CHANS,
        },
        "mask_decoder_config": {
            "hidden_size": C, "mlp_dim": DEC_MLP, "num_hidden_layers": 2,
            "num_attention_heads": 8, "iou_head_hidden_dim": C,
        },
    }  # fmt: skip


def tiny_upstream_config(**overrides) -> SegCompassConfig:
    fields = {
        "vlm_config": SegCompassConfig.tiny(vocab_size=128).vlm_config,
        "sam_config": tiny_sam(),
        "image_encoder_type": "sam",
        "sae_layer": 0,
        "d_sae": D_SAE,
        "sae_k": 8,
        "codebook_dim": D_Q,
        "codebook_heads": 2,
        "codebook_ffn_dim": 32,
        "ref_token_id": 9,
        **overrides,
    }
    return SegCompassConfig.upstream("qwen2.5-vl-7b", num_slots=K, **fields)


# ---------------------------------------------------------------- state-dict conversion
@pytest.fixture(scope="module")
def converted():
    book, head = upstream_modules()
    refseg = refseg_state_dict(book, head)
    sam = random_tensors(segment_anything_shapes(image_encoder=True), seed=5)
    config = tiny_upstream_config()
    # SAM first, then refseg: its trained prompt encoder and mask decoder win
    state = convert_upstream_state_dict(sam, config) | convert_upstream_state_dict(refseg, config)
    model = SegCompassForReasoningSegmentation(config).eval()
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("vlm.") for k in result.missing_keys)
    return {"book": book, "head": head, "refseg": refseg, "sam": sam, "model": model}


def test_codebook_slots_equal_upstream_query_book(converted):
    book, model = converted["book"], converted["model"]
    gen = torch.Generator().manual_seed(6)
    codes = torch.relu(torch.randn(2, 7, D_SAE, generator=gen) * 3)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        want = book(codes, mask)
        kept = codes.masked_fill(codes.abs() < 2.0, 0.0)
        indices = torch.arange(D_SAE).expand(2, 7, D_SAE)
        got = model.codebook(indices, kept, mask, sparse=False).slots
        got_sparse = model.codebook(indices, kept, mask, sparse=True).slots
    assert (got - want).abs().max() < 1e-5
    assert (got_sparse - want).abs().max() < 1e-5


def test_slot_mapper_equals_upstream_heatmap_head(converted):
    head, model = converted["head"], converted["model"]
    gen = torch.Generator().manual_seed(7)
    image = torch.randn(2, C, E, E, generator=gen)
    ref = torch.randn(2, K, 64, generator=gen)
    slots = torch.randn(2, K, D_Q, generator=gen)
    with torch.no_grad():
        want_maps, want_conf = head(image, ref, slots)
        out = model.slot_mapper(slots, ref, image)
    assert out.heatmap_logits.shape == (2, K, 4 * E, 4 * E)
    assert (out.heatmap_logits - want_maps).abs().max() < 1e-5
    assert (out.conf_logits - want_conf).abs().max() < 1e-5


def test_sam_parts_compute_what_segment_anything_computes(converted):
    refseg, sam, model = converted["refseg"], converted["sam"], converted["model"]
    # the prompt encoder's mask downscaling (conv, LayerNorm2d, GELU, conv, LayerNorm2d, GELU, conv)
    gen = torch.Generator().manual_seed(8)
    masks = torch.randn(3, 1, 4 * E, 4 * E, generator=gen)

    def norm2d(x, i):
        w, b = (
            refseg[f"prompt_encoder.mask_downscaling.{i}.weight"],
            refseg[f"prompt_encoder.mask_downscaling.{i}.bias"],
        )
        mean, var = (
            x.mean(1, keepdim=True),
            (x - x.mean(1, keepdim=True)).pow(2).mean(1, keepdim=True),
        )
        return (x - mean) / torch.sqrt(var + 1e-6) * w[:, None, None] + b[:, None, None]

    def conv(x, i, stride):
        p = f"prompt_encoder.mask_downscaling.{i}."
        return F.conv2d(x, refseg[p + "weight"], refseg[p + "bias"], stride=stride)

    want = conv(F.gelu(norm2d(conv(F.gelu(norm2d(conv(masks, 0, 2), 1)), 3, 2), 4)), 6, 1)
    with torch.no_grad():
        got = model.prompt_encoder.mask_embed(masks)
    assert (got - want).abs().max() < 1e-5
    # the mask decoder's MLPs: relu between layers, none after the last
    x = torch.randn(5, C, generator=gen)
    for name in ("iou_prediction_head", "output_hypernetworks_mlps.2"):
        p = f"mask_decoder.{name}.layers."
        h = x
        for j in range(3):
            h = F.linear(h, refseg[f"{p}{j}.weight"], refseg[f"{p}{j}.bias"])
            h = torch.relu(h) if j < 2 else h
        module = model.mask_decoder.get_submodule(name)
        with torch.no_grad():
            assert (module(x) - h).abs().max() < 1e-5
    # named tensors land where segment_anything keeps them
    state = model.state_dict()
    pairs = {
        "image_encoder.neck.layer_norm1.weight": sam["image_encoder.neck.1.weight"],
        "image_encoder.neck.conv2.weight": sam["image_encoder.neck.2.weight"],
        "image_encoder.layers.1.attn.rel_pos_h": sam["image_encoder.blocks.1.attn.rel_pos_h"],
        "image_encoder.patch_embed.projection.bias": sam["image_encoder.patch_embed.proj.bias"],
        "prompt_encoder.shared_embedding.positional_embedding": refseg[
            "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
        ],
        "mask_decoder.upscale_layer_norm.bias": refseg["mask_decoder.output_upscaling.1.bias"],
        "mask_decoder.transformer.layer_norm_final_attn.weight": refseg[
            "mask_decoder.transformer.norm_final_attn.weight"
        ],
        "mask_decoder.transformer.layers.1.layer_norm3.bias": refseg[
            "mask_decoder.transformer.layers.1.norm3.bias"
        ],
        "sae.W_enc": refseg["sae.W_enc"],
    }
    for name, tensor in pairs.items():
        assert torch.equal(state[name], tensor), name


def test_unknown_missing_and_misfit_keys_are_named():
    book, head = upstream_modules()
    refseg = refseg_state_dict(book, head)
    config = tiny_upstream_config()
    with pytest.raises(ValueError, match=r"not upstream SegCompass.*query_book\.extra"):
        convert_upstream_state_dict({**refseg, "query_book.extra": torch.zeros(1)}, config)
    cut = {k: v for k, v in refseg.items() if k != "heatmap_head.conf_head.3.bias"}
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*slot_mapper\.conf_head\.3\.bias"):
        convert_upstream_state_dict(cut, config)
    own_mapper = tiny_upstream_config(slot_mapper_type="segcompass", slot_mapper_heads=4)
    with pytest.raises(ValueError, match=r"no place.*SegCompassConfig\.upstream"):
        convert_upstream_state_dict(refseg, own_mapper)
    with pytest.raises(
        ValueError, match=r"shapes differ.*codebook\.codebook: \(32, 16\) vs \(64, 16\)"
    ):
        convert_upstream_state_dict(refseg, tiny_upstream_config(d_sae=64))


# ---------------------------------------------------------------- reading torch files
class NotATensor:
    """Any Python object: a pickle holding it could run code on load."""


def test_a_pickle_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "refseg_modules.pt"
    torch.save({"query_book.codebook.weight": torch.zeros(2, 2), "x": NotATensor()}, path)
    with pytest.raises(
        ValueError, match=r"pickled Python objects other than tensors.*weights_only"
    ):
        load_tensor_dict(path, "upstream refseg_modules.pt")
    torch.save({"a": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(ValueError, match=r"not str -> Tensor: 'epoch' \(int\)"):
        load_tensor_dict(path, "upstream refseg_modules.pt")
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="plain dict of tensors, got a list"):
        load_tensor_dict(path, "upstream refseg_modules.pt")


# ---------------------------------------------------------------- whole checkpoints
LOAD_SCRIPT = HIDE_PACKAGE + textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModel

    folder, inputs = sys.argv[1], sys.argv[2]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    data = torch.load(inputs)
    with torch.no_grad():
        mapped = model.slot_mapper(data["slots"], data["ref"], data["image"])
        out = model(**data["batch"])
    print(json.dumps({
        "module": type(model).__module__,
        "heatmap": mapped.heatmap_logits.tolist(),
        "conf": mapped.conf_logits.tolist(),
        "mask_sum": float(out.mask_logits.double().sum()),
        "conf_out": out.conf_logits.tolist(),
    }))
    """
)


@pytest.fixture(scope="module")
def upstream_checkpoint(tmp_path_factory):
    """An upstream step folder (refseg_modules.pt, llm_hf/) and a segment_anything .pth."""
    root = tmp_path_factory.mktemp("upstream")
    step = root / "global_step_100"
    llm_hf = step / "llm_hf"
    tokenizer = qwen_like_tokenizer()
    # upstream's register_tokens.py adds <REF_POS> as a special token and grows the embeddings
    tokenizer.add_tokens(
        [AddedToken("<REF_POS>", special=True, normalized=False)], special_tokens=True
    )
    torch.manual_seed(0)
    vlm_config = SegCompassConfig.tiny(vocab_size=len(tokenizer)).vlm_config
    Qwen2_5_VLForConditionalGeneration(vlm_config).save_pretrained(llm_hf)
    tokenizer.save_pretrained(llm_hf)
    Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=256, max_pixels=64 * 64
    ).save_pretrained(llm_hf)
    book, head = upstream_modules()
    refseg = refseg_state_dict(book, head)
    torch.save(refseg, step / "refseg_modules.pt")
    sam = random_tensors(segment_anything_shapes(image_encoder=True), seed=5)
    sam["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    torch.save(sam, root / "sam_vit_tiny.pth")
    return {"step": step, "sam": root / "sam_vit_tiny.pth", "book": book, "head": head,
            "refseg": refseg, "llm_hf": llm_hf}  # fmt: skip


@pytest.mark.slow
def test_converted_folder_loads_without_the_package_and_matches_upstream(
    upstream_checkpoint, tmp_path
):
    ckpt = upstream_checkpoint
    out = convert_upstream_checkpoint(
        ckpt["step"], tmp_path / "converted", sam=ckpt["sam"], hook_layer=1, dtype="float32"
    )
    model = SegCompassForReasoningSegmentation.from_pretrained(out).eval()
    config = model.config
    assert config.slot_mapper_type == "upstream" and config.num_slots == K
    assert config.sae_layer == 0 and config.sae_architecture == "relu"  # hidden_states[1]
    assert not config.sae_apply_b_dec_to_input and config.activation_threshold == 2.0
    refseg = ckpt["refseg"]
    assert torch.equal(model.sae.b_enc, refseg["sae.b_enc"])
    assert torch.equal(
        model.mask_decoder.iou_token.weight, refseg["mask_decoder.iou_token.weight"]
    )  # the trained decoder of refseg_modules.pt, not the SAM .pth's
    # <REF_POS> keeps upstream's id and survives skip_special_tokens (TRL's decoding)
    tokenizer = AutoTokenizer.from_pretrained(out)
    upstream_tokenizer = AutoTokenizer.from_pretrained(ckpt["llm_hf"])
    ref_id = upstream_tokenizer.convert_tokens_to_ids("<REF_POS>")
    assert config.ref_token_id == ref_id == tokenizer.convert_tokens_to_ids("<REF_POS>")
    ids = tokenizer("<think> red </think> <REF_POS>", add_special_tokens=False)["input_ids"]
    assert ref_id in ids
    assert "<REF_POS>" in tokenizer.decode(ids, skip_special_tokens=True)
    assert "<REF_POS>" not in upstream_tokenizer.decode([ref_id], skip_special_tokens=True)
    llm = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt["llm_hf"])
    rows = llm.get_input_embeddings().weight.shape[0]
    assert torch.equal(
        model.vlm.get_input_embeddings().weight[:rows], llm.get_input_embeddings().weight
    )

    gen = torch.Generator().manual_seed(9)
    image = torch.randn(1, C, E, E, generator=gen)
    ref = torch.randn(1, K, 64, generator=gen)
    slots = torch.randn(1, K, D_Q, generator=gen)
    with torch.no_grad():
        want_maps, want_conf = ckpt["head"](image, ref, slots)
    batch = make_batch(config, [2], seed=1)
    batch["input_ids"][batch["input_ids"] == 9] = config.ref_token_id
    batch.pop("sam_pixel_values")
    batch["sam_pixel_values"] = torch.randn(1, 3, E * PATCH, E * PATCH, generator=gen)
    with torch.no_grad():
        expected = model(**batch)
    inputs = tmp_path / "inputs.pt"
    torch.save({"slots": slots, "ref": ref, "image": image, "batch": batch}, inputs)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    run = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(out), str(inputs)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert not got["module"].startswith("modeling_segcompass.")
    assert (torch.tensor(got["heatmap"]) - want_maps).abs().max() < 1e-5
    assert (torch.tensor(got["conf"]) - want_conf).abs().max() < 1e-5
    assert abs(got["mask_sum"] - float(expected.mask_logits.double().sum())) < 1e-3
    assert torch.allclose(torch.tensor(got["conf_out"]), expected.conf_logits, atol=1e-5)


def test_checkpoint_holding_a_pickled_object_is_refused(upstream_checkpoint, tmp_path, capsys):
    step = tmp_path / "step"
    step.mkdir()
    torch.save({**upstream_checkpoint["refseg"], "note": NotATensor()}, step / "refseg_modules.pt")
    with pytest.raises(ValueError, match="pickled Python objects other than tensors"):
        convert_upstream_checkpoint(
            step, tmp_path / "out", sam=upstream_checkpoint["sam"], hook_layer=1
        )
    assert not (tmp_path / "out").exists()
    from modeling_segcompass.cli import main

    argv = ["convert-upstream", str(step), str(tmp_path / "out"), "--hook-layer", "1"]
    assert main([*argv, "--sam", str(upstream_checkpoint["sam"])]) == 2
    assert "pickled Python objects other than tensors" in capsys.readouterr().err


def test_llm_hf_without_weights_needs_base_model(upstream_checkpoint, tmp_path):
    step = tmp_path / "step"
    (step / "llm_hf").mkdir(parents=True)
    torch.save(upstream_checkpoint["refseg"], step / "refseg_modules.pt")
    with pytest.raises(ValueError, match=r"holds no LLM weights.*base_model"):
        convert_upstream_checkpoint(
            step, tmp_path / "out", sam=upstream_checkpoint["sam"], hook_layer=1
        )


# ---------------------------------------------------------------- command line
def test_convert_upstream_help_explains_every_argument(capsys):
    from modeling_segcompass.cli import main

    assert main(["convert-upstream", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("checkpoint_dir", "output_dir", "--sam", "--sae", "--base-model", "--base",
                   "--hook-layer", "--dtype", "--overwrite", "refseg_modules.pt", "llm_hf",
                   "weights_only"):  # fmt: skip
        assert option in text, option
