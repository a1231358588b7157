"""The SAE pretraining objective: reconstruction error plus the decoder-norm-weighted L1.

Two reconstruction scales, same sparsity term (SAELens' "standard" L1: the codes weighted by
the norms of their decoder rows, so that shrinking codes while growing the decoder does
not pay):

* ``"mean"`` (this package's default): squared error summed over the d_in features and
  divided by d_in, averaged over tokens; an `l1_coefficient` near 1 / d_in-scaled values
  balances it;
* ``"sum"`` (upstream SegCompass, `sae_harness/sae_trainer.py`): the squared error summed over
  the features, averaged over tokens, with L1 coefficient 5 (`UPSTREAM_SAE_L1_COEFFICIENT`).
  The two differ by the factor d_in on the reconstruction, which changes the balance
  against the L1 and what gradient clipping at norm 1 does.

Library side (not remote code).
"""

from __future__ import annotations

import torch

__all__ = ["SAE_RECONSTRUCTIONS", "UPSTREAM_SAE_L1_COEFFICIENT", "sae_pretraining_loss"]

#: Choices of the reconstruction scale of `sae_pretraining_loss`.
SAE_RECONSTRUCTIONS = ("mean", "sum")
#: `loss.l1_coef` of upstream's SAE training config (sae_harness/train_scripts/initial.yaml).
UPSTREAM_SAE_L1_COEFFICIENT = 5.0


def sae_pretraining_loss(
    x: torch.Tensor,
    acts: torch.Tensor,
    recon: torch.Tensor,
    decoder_weight: torch.Tensor,
    *,
    l1_coefficient: float,
    reconstruction: str = "mean",
) -> torch.Tensor:
    """Loss of one batch of tokens.

    Args:
        x: (N, d_in) SAE inputs.
        acts: (N, d_sae) codes (non-negative for relu / jumprelu / topk).
        recon: (N, d_in) reconstructions.
        decoder_weight: (d_sae, d_in) decoder rows (`SparseAutoencoder.W_dec`).
        l1_coefficient: weight of `mean over tokens of sum_i |a_i| ||W_dec_i||` (0: none).
        reconstruction: ``"mean"`` (squared error / d_in) or ``"sum"`` (upstream).

    Returns:
        The scalar loss.
    """
    if reconstruction not in SAE_RECONSTRUCTIONS:
        raise ValueError(
            f"reconstruction must be one of {SAE_RECONSTRUCTIONS}; got {reconstruction!r}."
        )
    error = (recon - x).pow(2).sum(-1).mean()  # (N, d_in) -> per-token sum -> token mean
    if reconstruction == "mean":
        error = error / x.shape[-1]
    if not l1_coefficient:
        return error
    sparsity = (acts.abs() * decoder_weight.norm(dim=-1)).sum(-1).mean()
    return error + l1_coefficient * sparsity
