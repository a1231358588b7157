"""Tests for modeling_segcompass/sparse_autoencoder.py."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_segcompass.sae_lens_format import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from modeling_segcompass.sparse_autoencoder import (
    SparseAutoencoder,
    SparseCodes,
    fraction_of_variance_unexplained,
    l0,
)

ARCHS = ["relu", "topk", "jumprelu"]


def build_tiny_sae(**overrides) -> SparseAutoencoder:
    """A tiny SAE with random (non-default) parameters so every term of the formula matters."""
    kwargs = {"d_in": 8, "d_sae": 32, "architecture": "topk", "k": 4}
    kwargs.update(overrides)
    sae = SparseAutoencoder(**kwargs)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(torch.randn_like(param) * (0.3 if name == "threshold" else 0.5))
    return sae


def dense_reference(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Dense codes written directly from the SAELens formulas, independent of the module."""
    sae_in = x - sae.b_dec if sae.apply_b_dec_to_input else x
    pre = sae_in @ sae.W_enc + sae.b_enc
    if sae.architecture == "relu":
        acts = pre.clamp_min(0)
    elif sae.architecture == "jumprelu":
        acts = pre.clamp_min(0) * (pre > sae.threshold.clamp_min(0))
    else:
        top = torch.topk(pre, sae.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
    return torch.where(acts.abs() < sae.activation_threshold, torch.zeros_like(acts), acts)


def scatter_codes(codes: SparseCodes, d_sae: int) -> torch.Tensor:
    """Sparse codes -> dense (..., d_sae), summing duplicates (padding slots hold 0)."""
    dense = torch.zeros(*codes.values.shape[:-1], d_sae, dtype=codes.values.dtype)
    return dense.scatter_add(-1, codes.indices, codes.values)


# ----------------------------------------------------------------------------- construction
def test_constructor_validates_with_clear_messages():
    with pytest.raises(ValueError, match=r"Unknown SAE architecture 'gated'.*jumprelu.*relu.*topk"):
        SparseAutoencoder(d_in=4, d_sae=8, architecture="gated")
    with pytest.raises(ValueError, match=r"`k` must be between 1 and d_sae=8.*k=9"):
        SparseAutoencoder(d_in=4, d_sae=8, architecture="topk", k=9)
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        SparseAutoencoder(d_in=4, d_sae=8, k=0)
    with pytest.raises(ValueError, match="`d_sae` must be a positive integer"):
        SparseAutoencoder(d_in=4, d_sae=-1)
    with pytest.raises(ValueError, match="activation_threshold"):
        SparseAutoencoder(d_in=4, d_sae=8, k=2, activation_threshold=-1.0)
    with pytest.raises(ValueError, match="max_active"):
        SparseAutoencoder(d_in=4, d_sae=8, architecture="relu", max_active=9)
    with pytest.raises(TypeError, match="positional"):
        SparseAutoencoder(4, 8)  # keyword-only hyperparameters
    # k only matters for topk; SAELens' "standard" is our relu.
    assert SparseAutoencoder(d_in=4, d_sae=8, architecture="relu").architecture == "relu"
    assert SparseAutoencoder(d_in=4, d_sae=8, architecture="standard").architecture == "relu"


def test_parameters_have_sae_lens_names_and_shapes_and_reset_is_tied():
    sae = SparseAutoencoder(d_in=6, d_sae=20, architecture="jumprelu", jumprelu_init_threshold=0.25)
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {
        "W_enc": (6, 20),
        "b_enc": (20,),
        "W_dec": (20, 6),
        "b_dec": (6,),
        "threshold": (20,),
    }
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(20), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.count_nonzero(sae.b_enc) == 0 and torch.count_nonzero(sae.b_dec) == 0
    assert torch.equal(sae.threshold, torch.full((20,), 0.25))
    assert "threshold" not in dict(SparseAutoencoder(d_in=6, d_sae=20, k=4).named_parameters())


# ----------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_pre_activations_hand_computed(apply_b_dec):
    sae = SparseAutoencoder(d_in=2, d_sae=3, architecture="relu", apply_b_dec_to_input=apply_b_dec)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.5, 0.0, 0.0]))
        sae.b_dec.copy_(torch.tensor([1.0, 1.0]))
    x = torch.tensor([[2.0, 3.0]])
    # with b_dec: x - b_dec = [1, 2] -> [1 + .5, 2, 2 - 2] ; without: [2 + .5, 3, 4 - 3]
    expected = torch.tensor([[1.5, 2.0, 0.0]]) if apply_b_dec else torch.tensor([[2.5, 3.0, 1.0]])
    assert torch.equal(sae.pre_activations(x), expected)


def test_topk_keeps_exactly_the_k_largest_pre_activations():
    sae = build_tiny_sae(architecture="topk", k=5)
    x = torch.randn(3, 7, 8)
    codes = sae.encode(x)
    assert codes.indices.shape == codes.values.shape == (3, 7, 5)
    assert codes.indices.dtype == torch.long
    with torch.no_grad():
        top = torch.topk(sae.pre_activations(x), 5, dim=-1)  # sorted, largest first
        codes = sae.encode(x)
    assert torch.equal(codes.values, top.values.clamp_min(0))
    positive = top.values > 0
    assert torch.equal(codes.indices[positive], top.indices[positive])
    assert torch.all(codes.indices[~positive] == 0)  # inactive slots: value 0, index 0


def test_relu_codes_scatter_back_to_relu_of_pre_activations():
    sae = build_tiny_sae(architecture="relu")
    x = torch.randn(4, 6, 8)
    with torch.no_grad():
        codes = sae.encode(x)
        pre = sae.pre_activations(x)
    assert torch.equal(scatter_codes(codes, 32), pre.clamp_min(0))
    # n is the largest number of active latents at any position; values sorted decreasingly
    assert codes.values.shape[-1] == int((pre > 0).sum(-1).max())
    assert torch.all(codes.values[..., :-1] >= codes.values[..., 1:])


def test_jumprelu_codes_match_sae_lens_formula_including_negative_thresholds():
    sae = build_tiny_sae(architecture="jumprelu")
    with torch.no_grad():
        sae.threshold[:4] = -1.0  # SAELens uses relu(threshold): negative acts as 0
    x = torch.randn(5, 8)
    with torch.no_grad():
        pre = sae.pre_activations(x)
        expected = pre * (pre > sae.threshold.clamp_min(0))
        assert torch.equal(scatter_codes(sae.encode(x), 32), expected)
        assert torch.equal(sae.encode_dense(x), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_threshold_zeroes_small_activations_exactly(arch):
    x = torch.randn(4, 5, 8)
    plain = build_tiny_sae(architecture=arch, k=6)
    cut = build_tiny_sae(architecture=arch, k=6, activation_threshold=0.8)
    cut.load_state_dict(plain.state_dict())
    with torch.no_grad():
        dense_plain = plain.encode_dense(x)
        dense_cut = scatter_codes(cut.encode(x), 32)
    keep = dense_plain.abs() >= 0.8
    assert keep.any() and (~keep & (dense_plain != 0)).any()  # the test cuts something
    assert torch.equal(dense_cut, torch.where(keep, dense_plain, torch.zeros_like(dense_plain)))
    values = cut.encode(x).values
    assert not torch.any((values.abs() > 0) & (values.abs() < 0.8))


def test_relu_max_active_keeps_the_largest_activations():
    sae = build_tiny_sae(architecture="relu", max_active=3)
    x = torch.randn(10, 8)
    with torch.no_grad():
        codes = sae.encode(x)
        full = dense_reference(sae, x)
    assert codes.values.shape == (10, 3)
    top3 = full.topk(3, dim=-1).values
    assert torch.equal(codes.values, top3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", [{}, {"activation_threshold": 0.3}, {"max_active": 5}])
def test_encode_dense_has_exactly_the_numbers_of_encode_and_the_reference(arch, options):
    sae = build_tiny_sae(architecture=arch, k=6, **options)
    x = torch.randn(2, 9, 8)
    with torch.no_grad():
        dense = sae.encode_dense(x)
        assert dense.shape == (2, 9, 32)
        assert torch.equal(scatter_codes(sae.encode(x), 32), dense)
        if "max_active" not in options:
            assert torch.allclose(dense, dense_reference(sae, x), atol=1e-6)
        else:
            assert int((dense != 0).sum(-1).max()) <= 5


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_sparse_equals_decode_dense_equals_hand_math(arch):
    sae = build_tiny_sae(architecture=arch)
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        reference = dense_reference(sae, x) @ sae.W_dec + sae.b_dec
        from_sparse = sae.decode(sae.encode(x))
        from_dense = sae.decode(sae.encode_dense(x))
        out = sae(x)
    assert from_sparse.shape == (3, 4, 8)
    assert torch.allclose(from_sparse, reference, atol=1e-5)
    assert torch.allclose(from_dense, reference, atol=1e-5)
    assert torch.equal(out.reconstruction, from_sparse)
    assert torch.equal(out.fvu, fraction_of_variance_unexplained(x, from_sparse))


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_encode_equals_unchunked(arch):
    x = torch.randn(5, 7, 8)
    small = build_tiny_sae(architecture=arch, chunk_size=3)
    large = build_tiny_sae(architecture=arch, chunk_size=1000)
    large.load_state_dict(small.state_dict())
    with torch.no_grad():
        a, b = small.encode(x), large.encode(x)
        assert torch.equal(a.indices, b.indices)
        assert torch.allclose(a.values, b.values, atol=1e-6)
        assert torch.allclose(small.encode_dense(x), large.encode_dense(x), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_all_weights_and_match_the_dense_path(arch):
    x = torch.randn(3, 5, 8)
    sparse_sae = build_tiny_sae(architecture=arch, chunk_size=4)
    dense_sae = build_tiny_sae(architecture=arch)
    dense_sae.load_state_dict(sparse_sae.state_dict())
    target = torch.randn(3, 5, 8)
    (sparse_sae.decode(sparse_sae.encode(x)) - target).pow(2).sum().backward()
    (dense_sae.decode(dense_sae.encode_dense(x)) - target).pow(2).sum().backward()
    for name in ("W_enc", "b_enc", "b_dec", "W_dec"):
        grad = getattr(sparse_sae, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.allclose(grad, getattr(dense_sae, name).grad, atol=1e-4), name
    if arch == "jumprelu":  # the sparse path treats the threshold as a constant
        assert sparse_sae.threshold.grad is None


def test_jumprelu_threshold_pseudo_gradient_hand_computed():
    sae = SparseAutoencoder(d_in=4, d_sae=4, architecture="jumprelu", apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.threshold.fill_(0.5)
    # pre = x; the rectangle window is |pre - 0.5| < bandwidth / 2 = 0.025: 0.49 and 0.52
    # are inside, 0.54 (inside a full bandwidth) and 0.7 are outside.
    x = torch.tensor([[0.49, 0.7, 0.52, 0.54]])
    codes = sae.encode_dense(x)
    assert torch.equal(codes, torch.tensor([[0.0, 0.7, 0.52, 0.54]]))
    codes.sum().backward()
    # d/dtheta = -(theta / bandwidth) * 1[in window] * grad_out = -(0.5 / 0.05) = -10
    assert torch.allclose(sae.threshold.grad, torch.tensor([-10.0, 0.0, -10.0, 0.0]))
    assert torch.equal(sae.W_enc.grad.diagonal(), torch.tensor([0.0, 0.7, 0.52, 0.54]))


def test_topk_encode_memory_is_bounded_by_the_chunk():
    d_sae, chunk = 65536, 64
    sae = SparseAutoencoder(d_in=64, d_sae=d_sae, architecture="topk", k=8, chunk_size=chunk)
    x = torch.randn(4, 512, 64)
    with torch.no_grad():
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            codes = sae.encode(x)
    largest = max(event.cpu_memory_usage for event in prof.events())
    full_buffer = 4 * 512 * d_sae * 4  # bytes of a dense (4 * 512, 65536) float32 buffer
    assert codes.values.shape == (4, 512, 8)
    assert 0 < largest <= 2 * chunk * d_sae * 4 < full_buffer


@pytest.mark.parametrize("arch", ARCHS)
def test_autograd_keeps_no_dense_code_buffer_for_backward(arch):
    # With gradients on, the only (..., d_sae)-wide tensor saved for backward may be W_enc
    # (d_in, d_sae) itself: no (chunk, d_sae) pre-activation survives its chunk.
    sae = SparseAutoencoder(d_in=4, d_sae=256, architecture=arch, k=4, chunk_size=10)
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        codes = sae.encode(torch.randn(3, 50, 4))
    assert codes.values.requires_grad
    wide = {shape for shape in saved_shapes if shape[-1] == 256}
    assert wide == {(4, 256)}


def test_pre_activation_calls_never_exceed_chunk_size():
    sae = build_tiny_sae(architecture="relu", chunk_size=5)
    rows_seen = []
    original = sae.pre_activations

    def spy(x):
        rows_seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return original(x)

    sae.pre_activations = spy
    sae.encode(torch.randn(3, 7, 8))
    assert rows_seen == [5, 5, 5, 5, 1]


def test_edge_cases_empty_batch_bfloat16_input_and_bad_shapes():
    sae = build_tiny_sae(architecture="topk", k=4)
    empty = sae.encode(torch.randn(0, 3, 8))
    assert empty.values.shape == (0, 3, 4)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(sae.encode(x.bfloat16()).values, sae.encode(x.bfloat16().float()).values)
    with pytest.raises(
        ValueError, match=r"expected inputs of shape \(\.\.\., d_in=8\), got shape \(2, 5\)"
    ):
        sae.encode(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        sae.encode(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, d_sae=32\)"):
        sae.decode(SparseCodes(torch.tensor([[40]]), torch.tensor([[1.0]])))
    with pytest.raises(ValueError, match=r"\(\.\.\., d_sae=32\)"):
        sae.decode(torch.randn(2, 31))
    # zero slots decode to b_dec
    nothing = SparseCodes(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0))
    assert torch.equal(sae.decode(nothing), sae.b_dec.detach().expand(2, 8))


def test_relu_codes_always_have_at_least_one_slot():
    sae = build_tiny_sae(architecture="relu", activation_threshold=1e6)  # nothing survives
    codes = sae.encode(torch.randn(3, 8))
    assert codes.values.shape == (3, 1)
    assert torch.count_nonzero(codes.values) == 0 and torch.count_nonzero(codes.indices) == 0


# ----------------------------------------------------------------------------- metrics
def test_fraction_of_variance_unexplained_and_l0_hand_computed():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total variance 2
    recon = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # squared error 1
    assert fraction_of_variance_unexplained(x, recon).item() == 0.5
    assert fraction_of_variance_unexplained(x, x).item() == 0.0
    mean_only = x.mean(0, keepdim=True).expand_as(x)
    assert fraction_of_variance_unexplained(x, mean_only).item() == 1.0
    assert l0(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])).item() == 1.0
    codes = SparseCodes(torch.tensor([[3, 0], [1, 2]]), torch.tensor([[0.5, 0.0], [1.0, 2.0]]))
    assert l0(codes).item() == 1.5
    sae = build_tiny_sae(architecture="relu")
    xs = torch.randn(6, 8)
    with torch.no_grad():
        assert l0(sae.encode(xs)).item() == l0(sae.encode_dense(xs)).item()


# ----------------------------------------------------------------------------- SAELens IO
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bit_exact(tmp_path, arch):
    sae = build_tiny_sae(
        architecture=arch, k=3, activation_threshold=0.25, max_active=None, chunk_size=7
    )
    sae.save(tmp_path, hook_name="model.language_model.layers.13", hook_layer=13)
    cfg = json.loads((tmp_path / SAE_CFG_FILENAME).read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (8, 32, "float32")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["hook_name"] == "model.language_model.layers.13"
    assert cfg["metadata"]["hook_layer"] == 13
    assert ("k" in cfg) == (arch == "topk") and cfg.get("k", 3) == 3
    names = set(load_file(tmp_path / SAE_WEIGHTS_FILENAME))
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec"} | (
        {"threshold"} if arch == "jumprelu" else set()
    )

    loaded = SparseAutoencoder.load(tmp_path)
    assert loaded.architecture == arch and loaded.activation_threshold == 0.25
    assert loaded.chunk_size == 7 and loaded.sae_metadata["hook_layer"] == 13
    original_state, loaded_state = sae.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name, tensor in original_state.items():
        assert torch.equal(tensor, loaded_state[name]) and loaded_state[name].dtype == tensor.dtype
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(sae(x).reconstruction, loaded(x).reconstruction)
    # overrides and dtype on load
    half = SparseAutoencoder.load(tmp_path, dtype="bfloat16", activation_threshold=0.0)
    assert half.W_enc.dtype == torch.bfloat16 and half.activation_threshold == 0.0


def _write_foreign(folder, cfg, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SAE_CFG_FILENAME).write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / SAE_WEIGHTS_FILENAME)


def _random_tensors(d_in, d_sae, jumprelu=False):
    tensors = {
        "W_enc": torch.randn(d_in, d_sae),
        "b_enc": torch.randn(d_sae) * 0.1,
        "W_dec": torch.randn(d_sae, d_in),
        "b_dec": torch.randn(d_in) * 0.1,
    }
    if jumprelu:
        tensors["threshold"] = torch.rand(d_sae) * 0.5
    return tensors


def test_loads_a_folder_in_sae_lens_6_layout(tmp_path):
    # The key set SAELens 6.x TopKSAEConfig.to_dict() writes (plus metadata it fills).
    cfg = {
        "d_in": 8,
        "d_sae": 32,
        "dtype": "float32",
        "device": "cuda",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.5.1",
            "sae_lens_training_version": "6.5.1",
            "model_name": "qwen2.5-vl-7b",
            "hook_name": "blocks.13.hook_resid_post",
            "context_size": 1024,
        },
        "architecture": "topk",
        "k": 5,
        "rescale_acts_by_decoder_norm": False,
    }
    tensors = _random_tensors(8, 32)
    _write_foreign(tmp_path, cfg, tensors)
    sae = SparseAutoencoder.load(tmp_path)
    assert (sae.architecture, sae.k, sae.apply_b_dec_to_input) == ("topk", 5, False)
    assert sae.W_enc.device.type == "cpu"
    assert sae.sae_metadata["hook_name"] == "blocks.13.hook_resid_post"
    x = torch.randn(3, 8)
    pre = x @ tensors["W_enc"] + tensors["b_enc"]
    top = pre.topk(5, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    with torch.no_grad():
        assert torch.allclose(
            sae(x).reconstruction, acts @ tensors["W_dec"] + tensors["b_dec"], atol=1e-5
        )


def test_loads_pre_6_flat_configs_and_log_threshold(tmp_path):
    # SAELens < 6: topk stored as "standard" + activation_fn_str "topk" + activation_fn_kwargs.
    old_topk = {
        "architecture": "standard",
        "d_in": 8,
        "d_sae": 32,
        "dtype": "float32",
        "hook_point": "blocks.3.hook_resid_pre",
        "hook_layer": 3,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 6},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": "3.13.0",
    }
    _write_foreign(tmp_path / "topk", old_topk, _random_tensors(8, 32))
    sae = SparseAutoencoder.load(tmp_path / "topk")
    assert (sae.architecture, sae.k) == ("topk", 6)
    assert sae.sae_metadata["hook_name"] == "blocks.3.hook_resid_pre"

    jump = dict(old_topk, architecture="jumprelu", activation_fn_str="relu")
    tensors = _random_tensors(8, 32, jumprelu=True)
    tensors["log_threshold"] = tensors.pop("threshold").log()
    _write_foreign(tmp_path / "jump", jump, tensors)
    sae = SparseAutoencoder.load(tmp_path / "jump")
    assert torch.allclose(sae.threshold, tensors["log_threshold"].exp())


def test_rescale_acts_by_decoder_norm_is_folded_exactly(tmp_path):
    cfg = {"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 4, "dtype": "float32",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "rescale_acts_by_decoder_norm": True, "metadata": {"sae_lens_version": "6.20.0"}}  # fmt: skip
    t = _random_tensors(8, 32)
    _write_foreign(tmp_path, cfg, t)
    sae = SparseAutoencoder.load(tmp_path)
    x = torch.randn(5, 8)
    norms = t["W_dec"].norm(dim=-1)
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms  # SAELens TopKSAE.encode
    top = pre.topk(4, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    expected = (acts / norms) @ t["W_dec"] + t["b_dec"]  # SAELens _act_times_W_dec
    with torch.no_grad():
        out = sae(x)
    assert torch.equal(out.codes.indices.sort(-1).values, top.indices.sort(-1).values)
    assert torch.allclose(out.reconstruction, expected, atol=1e-5)


def test_load_refuses_pickle_only_folders_and_missing_files(tmp_path):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "sae_weights.pt").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="refusing to unpickle.*safetensors"):
        SparseAutoencoder.load(tmp_path / "pickled")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SparseAutoencoder.load(tmp_path / "nowhere")
    (tmp_path / "no_cfg").mkdir()
    save_file(_random_tensors(8, 32), tmp_path / "no_cfg" / SAE_WEIGHTS_FILENAME)
    with pytest.raises(FileNotFoundError, match="has no cfg.json"):
        SparseAutoencoder.load(tmp_path / "no_cfg")


def test_load_rejects_bad_shapes_missing_tensors_and_unsupported_configs(tmp_path):
    base = {"architecture": "standard", "d_in": 8, "d_sae": 32, "dtype": "float32"}
    bad_shape = _random_tensors(8, 32)
    bad_shape["W_dec"] = torch.randn(32, 7)
    _write_foreign(tmp_path / "shape", base, bad_shape)
    with pytest.raises(ValueError, match=r"'W_dec'.*\(32, 7\).*requires \(32, 8\)"):
        SparseAutoencoder.load(tmp_path / "shape")

    _write_foreign(
        tmp_path / "missing", dict(base, architecture="jumprelu"), _random_tensors(8, 32)
    )
    with pytest.raises(ValueError, match=r"lacks the tensors \['threshold'\]"):
        SparseAutoencoder.load(tmp_path / "missing")

    _write_foreign(tmp_path / "gated", dict(base, architecture="gated"), _random_tensors(8, 32))
    with pytest.raises(ValueError, match="'gated'.*not supported.*standard.*topk.*jumprelu"):
        SparseAutoencoder.load(tmp_path / "gated")

    _write_foreign(
        tmp_path / "norm", dict(base, normalize_activations="layer_norm"), _random_tensors(8, 32)
    )
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'.*only 'none'"):
        SparseAutoencoder.load(tmp_path / "norm")

    _write_foreign(tmp_path / "nok", dict(base, architecture="topk"), _random_tensors(8, 32))
    with pytest.raises(ValueError, match="topk SAE but has no 'k'"):
        SparseAutoencoder.load(tmp_path / "nok")


def test_data_on_decoder_directions_is_reconstructed_exactly_by_a_tied_topk1_sae():
    # Points c * d_i on decoder directions: a tied SAE (W_enc = W_dec.T, unit rows) picks
    # latent i with value c, so the reconstruction is exact and L0 is 1.
    sae = SparseAutoencoder(d_in=8, d_sae=16, architecture="topk", k=1)
    basis = sae.W_dec.detach()[:4]
    coefficients = torch.rand(64, 1) * 3 + 1
    which = torch.randint(0, 4, (64,))
    x = coefficients * basis[which]
    with torch.no_grad():
        out = sae(x)
    assert out.fvu.item() < 1e-6
    assert math.isclose(l0(out.codes).item(), 1.0)
    assert torch.equal(out.codes.indices[:, 0], which)


# ----------------------------------------------------------------------------- no-grad encode
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_no_grad_encode_gives_the_numbers_of_the_autograd_path(arch, threshold):
    """The in-place selection (no grad) and the autograd path pick the same codes, bit for bit."""
    sae = build_tiny_sae(architecture=arch, activation_threshold=threshold, chunk_size=4)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        fast = sae.encode(x)
    tracked = sae.encode(x)  # parameters require grad: the graph path
    assert tracked.values.requires_grad and not fast.values.requires_grad
    assert torch.equal(fast.indices, tracked.indices)
    assert torch.equal(fast.values, tracked.values.detach())
    reference = dense_reference(sae, x).detach()  # unchunked GEMM: a few ulps apart
    assert torch.allclose(scatter_codes(fast, sae.d_sae), reference, atol=1e-6)


def test_activation_threshold_keeps_a_value_exactly_at_the_threshold():
    # |a| < t is dropped, |a| == t kept, on both paths (as upstream's masked_fill(|a| < t, 0))
    sae = SparseAutoencoder(
        d_in=4, d_sae=4, architecture="relu", apply_b_dec_to_input=False, activation_threshold=0.5
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.b_enc.zero_()
    x = torch.tensor([[0.5, 0.49999997, 0.75, -0.5]])
    with torch.no_grad():
        fast = sae.encode(x)
    tracked = sae.encode(x)
    expected = torch.tensor([[0.5, 0.0, 0.75, 0.0]])
    assert torch.equal(scatter_codes(fast, 4), expected)
    assert torch.equal(
        scatter_codes(SparseCodes(tracked.indices, tracked.values.detach()), 4), expected
    )


def _peak_bytes(fn) -> int:
    """Largest tensor memory held at once during fn() (allocator events in time order)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    peak = running = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_threshold_mode_no_grad_encode_makes_no_dense_copy(arch):
    """relu / jumprelu + activation threshold without grad: one (chunk, d_sae) float buffer
    and one bool of that shape at most (no relu copy, thresholded copy or abs())."""
    d_sae, chunk = 16384, 32
    sae = SparseAutoencoder(
        d_in=16, d_sae=d_sae, architecture=arch, activation_threshold=2.0, chunk_size=chunk
    )
    x = torch.randn(2, 96, 16)
    with torch.no_grad():
        sae.b_enc.fill_(-3.0)  # sparse, as a trained SAE: a few latents per token pass 2.0
        codes = sae.encode(x)
        peak = _peak_bytes(lambda: sae.encode(x))
    active = int((codes.values != 0).sum(-1).max())
    assert 1 <= active <= 64, active  # the sparse regime the bound below is about
    buffer = chunk * d_sae * 4  # one float32 (chunk, d_sae) pre-activation buffer
    assert buffer <= peak <= 1.5 * buffer  # + a bool mask (1/4) and the small outputs


@pytest.mark.parametrize("max_active", [None, 2])
def test_padding_slots_never_copy_an_active_column_zero(max_active):
    # row 0 has 1 active latent (column 0), row 1 has 3: row 0 gets padding slots, whose
    # index must not duplicate column 0's value on either path
    sae = SparseAutoencoder(
        d_in=4, d_sae=4, architecture="relu", apply_b_dec_to_input=False, max_active=max_active
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.b_enc.zero_()
    x = torch.tensor([[0.9, -1.0, -1.0, -1.0], [0.3, 0.2, -1.0, 0.7]], requires_grad=True)
    with torch.no_grad():
        fast = sae.encode(x)
    tracked = sae.encode(x)
    expected = torch.tensor([[0.9, 0.0, 0.0, 0.0], [0.3, 0.2, 0.0, 0.7]])
    if max_active == 2:
        expected[1, 1] = 0.0  # the 2 largest are kept
    assert fast.values.shape == (2, 3 if max_active is None else 2)
    assert torch.equal(fast.values[0], torch.tensor([0.9] + [0.0] * (fast.values.shape[1] - 1)))
    assert torch.equal(fast.values, tracked.values.detach())
    assert torch.equal(fast.indices, tracked.indices)
    assert torch.equal(scatter_codes(fast, 4), expected)
    tracked.values.sum().backward()
    assert torch.equal(x.grad, (expected > 0).float())  # one gradient per kept latent


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("chunk_size", [10_000, 7])
def test_encode_pair_is_encode_of_the_input_and_of_its_detached_copy(architecture, chunk_size):
    """One selection serves both codes: the same numbers as two `encode` calls, the first's
    gradient reaches the input and the SAE, the second's only the SAE. In one chunk the loss
    and every gradient are bitwise those of the two calls; over several chunks the SAE's
    gradients add the (2 x chunks) contributions in another order (float32 rounding)."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        d_in=16, d_sae=64, architecture=architecture, k=5,
        activation_threshold=0.0 if architecture == "topk" else 0.1,
    )  # fmt: skip
    sae.chunk_size = chunk_size
    x = torch.randn(3, 9, 16, requires_grad=True)
    weights = torch.randn(3, 9, 16)

    def run(pair: bool):
        sae.zero_grad(set_to_none=True)
        x.grad = None
        main, detached = sae.encode_pair(x) if pair else (sae.encode(x), sae.encode(x.detach()))
        loss = 2 * main.values.sum() + (sae.decode(main) * weights).sum()
        loss = loss + sae.decode(detached).square().sum()
        loss.backward()
        grads = {n: p.grad for n, p in sae.named_parameters() if p.grad is not None}
        return loss.detach(), x.grad, grads, main, detached

    loss, x_grad, grads, main, detached = run(True)
    loss_ref, x_grad_ref, grads_ref, main_ref, detached_ref = run(False)
    assert torch.equal(loss, loss_ref) and torch.equal(x_grad, x_grad_ref)
    for got, want in ((main, main_ref), (detached, detached_ref)):
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    assert sorted(grads) == sorted(grads_ref) and {"W_enc", "b_enc", "b_dec"} <= set(grads)
    for name, grad in grads.items():
        if chunk_size == 10_000:
            assert torch.equal(grad, grads_ref[name]), name
        else:
            torch.testing.assert_close(grad, grads_ref[name], rtol=1e-5, atol=1e-6)
    # the detached codes' loss reaches the SAE only
    sae.zero_grad(set_to_none=True)
    x.grad = None
    sae.decode(sae.encode_pair(x)[1]).sum().backward()
    assert x.grad is None and sae.W_enc.grad is not None
    with torch.no_grad():
        first, second = sae.encode_pair(x)
    assert first is second and torch.equal(first.values, main.values.detach())
