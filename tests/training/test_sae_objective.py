"""SAE pretraining objective: the package's scale and upstream's, against a re-implementation
of upstream's loss written here from reading upstream SegCompass
(github.com/ZhenyuLU-Heliodore/SegCompass, sae_harness/sae_trainer.py `_compute_loss`):
per token the squared error summed over features and the L1 of the codes weighted by the
decoder-row norms, both averaged over the real tokens; loss = error + 5 * L1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_segcompass.sparse_autoencoder import SparseAutoencoder
from modeling_segcompass.training.sae_objective import (
    UPSTREAM_SAE_L1_COEFFICIENT,
    sae_pretraining_loss,
)
from modeling_segcompass.training.sae_training import train_sae


def reference_upstream_loss(sae, hidden, attention_mask):
    """(B, L, d_in) hidden states, (B, L) mask -> upstream's loss (float64)."""
    valid = (attention_mask != 0).double()
    x = hidden.double()
    acts = sae.encode_dense(hidden).double()
    recon = sae.decode(sae.encode_dense(hidden)).double()
    per_token = F.mse_loss(recon, x, reduction="none").sum(-1)
    error = (per_token * valid).sum() / valid.sum().clamp_min(1)
    row_norms = sae.W_dec.double().norm(dim=1)
    sparsity = (acts * row_norms).norm(p=1, dim=-1)
    l1 = (sparsity * valid).sum() / valid.sum().clamp_min(1)
    return error + 5.0 * l1


def random_sae(seed: int) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d_in=24, d_sae=96, architecture="relu", apply_b_dec_to_input=False)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae


@torch.no_grad()
def test_upstream_scale_matches_the_reference():
    worst = 0.0
    for seed in range(20):
        sae = random_sae(seed)
        hidden = torch.randn(3, 7, 24)
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[1, 5:] = 0  # padding: upstream averages over real tokens, the cache holds only them
        x = hidden[mask.bool()]  # (N, d_in) real tokens
        acts = sae.encode_dense(x)
        got = sae_pretraining_loss(
            x, acts, sae.decode(acts), sae.W_dec,
            l1_coefficient=UPSTREAM_SAE_L1_COEFFICIENT, reconstruction="sum",
        )  # fmt: skip
        want = reference_upstream_loss(sae, hidden, mask)
        worst = max(worst, abs(got.item() - want.item()) / want.item())
    assert worst < 1e-5, worst  # relative, float32 against float64


@torch.no_grad()
def test_mean_scale_is_the_sum_over_d_in_plus_the_same_l1():
    sae = random_sae(0)
    x = torch.randn(10, 24)
    acts = sae.encode_dense(x)
    recon = sae.decode(acts)
    mean = sae_pretraining_loss(x, acts, recon, sae.W_dec, l1_coefficient=0.0)
    total = sae_pretraining_loss(
        x, acts, recon, sae.W_dec, l1_coefficient=0.0, reconstruction="sum"
    )
    assert float(mean) == pytest.approx(float(total) / 24, rel=1e-6)
    with pytest.raises(ValueError, match="reconstruction"):
        sae_pretraining_loss(x, acts, recon, sae.W_dec, l1_coefficient=1.0, reconstruction="x")


def test_train_sae_with_the_upstream_objective():
    torch.manual_seed(0)
    data = torch.randn(512, 24) @ torch.randn(24, 24)
    sae = SparseAutoencoder(d_in=24, d_sae=96, architecture="relu", apply_b_dec_to_input=False)
    report = train_sae(
        sae, data, steps=30, batch_size=128, lr=1e-3, reconstruction="sum",
        l1_coefficient=UPSTREAM_SAE_L1_COEFFICIENT, progress=False, eval_tokens=512,
    )  # fmt: skip
    assert report.losses[-1] < report.losses[0]
    with pytest.raises(ValueError, match="reconstruction"):
        train_sae(sae, data, steps=1, reconstruction="l2", progress=False)
