"""SAE pretraining: activation caching, streaming, training, SAELens save and model loading."""

from __future__ import annotations

import json
import os

import pytest
import torch

from modeling_segcompass.sparse_autoencoder import (
    SparseAutoencoder,
    fraction_of_variance_unexplained,
)
from modeling_segcompass.training.sae_training import (
    ActivationCache,
    cache_activations,
    evaluate_sae,
    load_sae_into_model,
    pretrain_sae_for_model,
    train_sae,
)
from tests.helpers import build_tiny_model, make_batch

REFS = [[1, 2, 3, 1], [3, 0, 2, 1], [2, 2, 1, 3]]  # rows of different lengths: padding


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


@pytest.fixture(scope="module")
def batches(model):
    return [make_batch(model.config, REFS[i % 3], seed=i) for i in range(8)]


@pytest.fixture(scope="module")
def cache(model, batches, tmp_path_factory):
    return cache_activations(
        model, batches, tmp_path_factory.mktemp("cache") / "acts", shard_tokens=300, progress=False
    )


def reference_rows(model, batches, layer):
    """The hidden states the forward's SAE hook sees: output of decoder layer `layer`."""
    rows = []
    with torch.no_grad():
        for batch in batches:
            out = model.vlm.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                image_grid_thw=batch["image_grid_thw"],
                output_hidden_states=True,
                use_cache=False,
            )
            hidden = out.hidden_states[layer + 1]  # (B, L, d); [0] is the embedding output
            rows.append(hidden[batch["attention_mask"].bool()])
    return torch.cat(rows)


# --------------------------------------------------------------------------- caching
def test_cache_holds_the_unpadded_layer_outputs_in_bounded_shards(model, batches, cache):
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert cache.num_tokens == tokens
    assert cache.layer == model.config.sae_layer and cache.d_in == 64
    assert all(n == 300 for n in cache.shard_sizes[:-1]) and 0 < cache.shard_sizes[-1] <= 300
    assert len(cache.shards) == -(-tokens // 300)
    cached = torch.cat([cache.read_shard(i) for i in range(len(cache.shards))])
    expected = reference_rows(model, batches, model.config.sae_layer)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
    # reopening gives the same description
    assert ActivationCache.open(cache.directory) == cache


def test_cache_of_another_layer_and_max_tokens(model, batches, tmp_path):
    other = cache_activations(
        model, batches, tmp_path / "l1", layer=1, max_tokens=100, progress=False
    )
    assert other.num_tokens == 100 and other.layer == 1
    # the last layer's output before the final norm (hidden_states[-1] is after it)
    captured = []
    layer = model.vlm.model.language_model.layers[1]
    handle = layer.register_forward_hook(
        lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model.vlm.model(
            **{
                k: batches[0][k]
                for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
            }
        )
    handle.remove()
    expected = captured[0][batches[0]["attention_mask"].bool()][:100]
    assert expected.shape[0] == 100
    torch.testing.assert_close(other.read_shard(0), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other.read_shard(0), reference_rows(model, batches[:1], 0)[:100])


def test_cache_refuses_bad_inputs(model, batches, cache, tmp_path):
    with pytest.raises(FileExistsError, match="already holds"):
        cache_activations(model, batches, cache.directory, progress=False)
    with pytest.raises(ValueError, match=r"decoder layer index in \[0, 2\)"):
        cache_activations(model, batches, tmp_path / "x", layer=5, progress=False)
    with pytest.raises(KeyError, match="attention_mask"):
        cache_activations(
            model, [{"input_ids": batches[0]["input_ids"]}], tmp_path / "y", progress=False
        )
    # an interrupted cache (shards but no manifest) is not a cache
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "shard_00000.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="interrupted"):
        ActivationCache.open(tmp_path / "half")


@pytest.mark.parametrize("shuffle", [False, True])
def test_one_pass_yields_every_token_exactly_once(cache, shuffle):
    everything = torch.cat([cache.read_shard(i) for i in range(len(cache.shards))])
    got = list(cache.iter_batches(64, shuffle=shuffle, buffer_tokens=400, seed=3))
    assert all(b.shape == (64, 64) for b in got[:-1]) and got[-1].shape[0] <= 64
    rows = torch.cat(got)
    assert rows.shape == everything.shape

    def canonical(t):  # sort rows lexicographically by their first columns
        return t[torch.argsort(t[:, 0] * 1e3 + t[:, 1])]

    torch.testing.assert_close(canonical(rows), canonical(everything), atol=0, rtol=0)
    if shuffle:
        assert not torch.equal(rows, everything)
        again = torch.cat(list(cache.iter_batches(64, buffer_tokens=400, seed=3)))
        assert torch.equal(rows, again)  # seeded
        other = torch.cat(list(cache.iter_batches(64, buffer_tokens=400, seed=4)))
        assert not torch.equal(rows, other)
    else:
        assert torch.equal(rows, everything)
    dropped = list(cache.iter_batches(64, shuffle=shuffle, drop_last=True))
    assert sum(b.shape[0] for b in dropped) == cache.num_tokens // 64 * 64


# --------------------------------------------------------------------------- training
def test_evaluate_sae_matches_the_reference_fvu_and_l0(cache):
    sae = SparseAutoencoder(d_in=64, d_sae=128, architecture="topk", k=5)
    everything = torch.cat([cache.read_shard(i) for i in range(len(cache.shards))])
    fvu, l0_value = evaluate_sae(sae, cache, batch_size=100)  # streamed over 13 batches
    with torch.no_grad():
        expected = fraction_of_variance_unexplained(everything, sae(everything).reconstruction)
    assert fvu == pytest.approx(float(expected), rel=1e-4)
    assert l0_value == pytest.approx(5.0)


def test_topk_training_cuts_fvu_and_keeps_l0_at_k(cache):
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=64, d_sae=512, architecture="topk", k=16)
    report = train_sae(sae, cache, steps=120, batch_size=256, lr=3e-3, progress=False)
    assert report.steps == 120 and len(report.losses) == 120
    assert report.l0 == 16.0
    assert report.fvu < 0.2 * report.initial_fvu
    assert report.fvu < 0.15
    assert sum(report.losses[-10:]) < 0.3 * sum(report.losses[:10])
    assert 0.0 <= report.dead_fraction < 1.0


def test_relu_l1_penalty_lowers_l0_as_it_grows_and_kills_latents(cache):
    l0s, reports = [], []
    for coefficient in (0.0, 1e-3, 1e-2):
        torch.manual_seed(0)
        sae = SparseAutoencoder(d_in=64, d_sae=256, architecture="relu")
        report = train_sae(
            sae,
            cache,
            steps=60,
            batch_size=256,
            lr=3e-3,
            l1_coefficient=coefficient,
            dead_window_tokens=cache.num_tokens,
            progress=False,
        )
        l0s.append(report.l0)
        reports.append(report)
    assert l0s[0] > l0s[1] > l0s[2]
    assert l0s[0] > 4 * l0s[2]
    assert reports[2].dead_fraction > reports[0].dead_fraction
    # without the penalty the relu SAE reconstructs well
    assert reports[0].fvu < 0.1


def test_train_sae_rejects_a_width_mismatch_and_bad_settings(cache):
    with pytest.raises(ValueError, match="width 64, the SAE expects d_in=32"):
        train_sae(SparseAutoencoder(d_in=32, d_sae=64), cache, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be"):
        train_sae(SparseAutoencoder(d_in=64, d_sae=64), cache, steps=0, progress=False)


def test_train_sae_on_a_tensor_and_dead_latents_are_counted(cache):
    data = torch.randn(512, 64)
    sae = SparseAutoencoder(d_in=64, d_sae=128, architecture="topk", k=4)
    with torch.no_grad():
        sae.b_enc[:64] = -1e4  # half the latents can never fire
    report = train_sae(sae, data, steps=5, batch_size=128, lr=1e-4, progress=False)
    assert report.dead_fraction >= 0.5
    assert report.tokens_seen == 5 * 128


# --------------------------------------------------------------------------- model glue
def test_pretrain_saves_saelens_and_loads_bit_exact_into_the_model(batches, tmp_path):
    model = build_tiny_model()
    before = model.sae.W_enc.detach().clone()
    result = pretrain_sae_for_model(
        model, batches, tmp_path / "sae", steps=40, batch_size=256, lr=3e-3, progress=False
    )
    assert result.report.fvu < result.report.initial_fvu
    with open(tmp_path / "sae" / "cfg.json") as f:
        cfg = json.load(f)
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 64 and cfg["d_sae"] == 512
    layer = model.config.sae_layer
    assert cfg["metadata"]["hook_layer"] == cfg["hook_layer"] == layer
    assert cfg["metadata"]["hook_name"] == cfg["hook_name"] == f"blocks.{layer}.hook_resid_post"
    assert not torch.equal(model.sae.W_enc, before)
    saved = SparseAutoencoder.load(tmp_path / "sae")
    for name, param in saved.named_parameters():
        assert torch.equal(getattr(model.sae, name), param), name
    # the temporary activation cache is gone
    assert not os.path.exists(result.cache.directory)
    # a fresh model loading the folder encodes exactly like the pretrained one
    fresh = build_tiny_model()
    load_sae_into_model(fresh, tmp_path / "sae")
    batch = batches[0]
    with torch.no_grad():
        a = model(**batch, compute_logits=False)
        b = fresh(**batch, compute_logits=False)
    assert torch.equal(a.concept_indices, b.concept_indices)
    assert torch.equal(a.concept_values, b.concept_values)


def test_export_model_sae_writes_the_current_sae_with_a_complete_saelens_config(tmp_path):
    from modeling_segcompass.training.sae_export import export_model_sae

    model = build_tiny_model(sae_layer=1)
    export_model_sae(model, tmp_path / "sae")
    with torch.no_grad():  # fine-tuning moves the SAE on; a second export replaces the first
        model.sae.W_enc.add_(0.1)
    export_model_sae(model, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (cfg["hook_name"], cfg["hook_layer"]) == ("blocks.1.hook_resid_post", 1)
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["hook_layer"] == 1
    saved = SparseAutoencoder.load(tmp_path / "sae")
    for name, param in saved.named_parameters():
        assert torch.equal(getattr(model.sae, name), param), name


def test_load_sae_into_model_keeps_encoding_options_and_updates_the_config(tmp_path):
    model = build_tiny_model(activation_threshold=0.5)
    sae = SparseAutoencoder(d_in=64, d_sae=512, architecture="relu")
    sae.save(tmp_path / "relu")
    loaded = load_sae_into_model(model, tmp_path / "relu")
    assert model.sae is loaded and loaded.architecture == "relu"
    assert model.config.sae_architecture == "relu"
    assert loaded.activation_threshold == 0.5  # the model's codebook-input threshold is kept
    SparseAutoencoder(d_in=32, d_sae=512).save(tmp_path / "narrow")
    with pytest.raises(ValueError, match="d_in=32, but the model's language model has hidden"):
        load_sae_into_model(model, tmp_path / "narrow")
    SparseAutoencoder(d_in=64, d_sae=256).save(tmp_path / "small")
    with pytest.raises(ValueError, match="codebook expects config.d_sae=512"):
        load_sae_into_model(model, tmp_path / "small")
