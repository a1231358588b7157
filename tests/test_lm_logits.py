"""LM logits of `SegCompassForReasoningSegmentation.forward`: full, none, or labelled positions only.

With labels and the default `compute_logits=None`, the LM loss projects only the positions
that predict a label; the loss, every gradient and the other outputs must equal those of the
full-logits computation (`compute_logits=True`).
"""

from __future__ import annotations

import torch

from tests.helpers import build_tiny_model, make_batch


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_labelled_positions_give_the_loss_and_gradients_of_full_logits():
    model = build_tiny_model().train()
    batch = make_batch(model.config, [3, 1], with_targets=True)
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    model.zero_grad(set_to_none=True)
    full = model(**batch, compute_logits=True)
    full.loss.backward()
    full_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    labelled = model(**batch)  # default: labels given -> labelled positions only
    labelled.loss.backward()
    labelled_grads = _grads(model)
    B, L = batch["input_ids"].shape
    assert full.logits.shape == (B, L, model.config.vlm_text_config.vocab_size)
    assert labelled.logits is None
    torch.testing.assert_close(labelled.lm_loss, full.lm_loss)
    torch.testing.assert_close(labelled.loss, full.loss)
    # the LM loss by hand from the full logits
    shift = full.logits[:, :-1].reshape(-1, full.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(shift, batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(full.lm_loss, expected)
    assert set(labelled_grads) == set(full_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(labelled_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert model.vlm.lm_head.weight.grad.abs().sum() > 0  # (tied to the input embedding)
    torch.testing.assert_close(labelled.mask_logits, full.mask_logits)


def test_compute_logits_switch():
    model = build_tiny_model().eval()
    batch = make_batch(model.config, [2], with_targets=True)
    plain = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert model(**plain).logits.shape[:2] == batch["input_ids"].shape  # no labels: full
        assert model(**plain, compute_logits=False).logits is None
        off = model(**batch, compute_logits=False)
        on = model(**batch, compute_logits=True)
    assert off.logits is None and on.logits is not None
    torch.testing.assert_close(off.lm_loss, on.lm_loss)


def test_no_labelled_position_gives_a_zero_loss_that_still_reaches_the_lm_head():
    model = build_tiny_model().train()
    batch = make_batch(model.config, [1], with_targets=True)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    out = model(**batch)
    assert out.lm_loss.item() == 0.0
    out.lm_loss.backward()
    assert model.vlm.lm_head.weight.grad is not None
