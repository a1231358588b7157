import pytest
import torch

from modeling_segcompass.query_codebook import QueryCodebook


def build(**overrides):
    kwargs = dict(d_sae=96, codebook_dim=16, num_slots=3, num_layers=2, num_heads=4, ffn_dim=32)
    kwargs.update(overrides)
    return QueryCodebook(**kwargs).eval()


def random_codes(batch=2, length=7, n=5, d_sae=96):
    indices = torch.randint(0, d_sae, (batch, length, n))
    values = torch.rand(batch, length, n) * 3
    values[..., -1] = 0.0  # padding slots of relu-style codes
    return indices, values


def test_sparse_projection_equals_dense_product():
    book = build()
    indices, values = random_codes()
    dense_codes = torch.zeros(2, 7, 96).scatter_add_(-1, indices, values)
    expected = dense_codes @ book.codebook
    torch.testing.assert_close(book.project(indices, values, sparse=True), expected)
    torch.testing.assert_close(book.project(indices, values, sparse=False), expected)


def test_sparse_and_dense_forward_agree_including_gradients():
    book = build()
    indices, values = random_codes()
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    out_sparse = book(indices, values, mask, sparse=True)
    grad_sparse = torch.autograd.grad(out_sparse.slots.square().sum(), book.codebook)[0]
    out_dense = book(indices, values, mask, sparse=False)
    grad_dense = torch.autograd.grad(out_dense.slots.square().sum(), book.codebook)[0]
    torch.testing.assert_close(out_sparse.slots, out_dense.slots)
    torch.testing.assert_close(grad_sparse, grad_dense)
    # only latents active on some real (unpadded) token receive gradient
    active = torch.zeros(96, dtype=torch.bool)
    active[indices[(values != 0) & mask.bool()[..., None]]] = True
    assert grad_sparse[~active].abs().sum() == 0
    assert (grad_sparse[active].abs().sum(-1) > 0).all()


def test_padding_tokens_do_not_change_slots_and_get_no_attention():
    book = build()
    indices, values = random_codes(batch=1, length=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    out = book(indices, values, mask)
    # change the padded tokens' codes: slots must not move
    indices2, values2 = indices.clone(), values.clone()
    indices2[:, 4:] = torch.randint(0, 96, indices2[:, 4:].shape)
    values2[:, 4:] = 5.0
    out2 = book(indices2, values2, mask)
    torch.testing.assert_close(out.slots, out2.slots)
    assert out.slot_token_attention[..., 4:].abs().max() == 0
    torch.testing.assert_close(out.slot_token_attention.sum(-1), torch.ones(1, 3))


def test_concept_weights_are_attention_times_activation():
    book = build()
    indices, values = random_codes(batch=1)
    out = book(indices, values)
    expected = out.slot_token_attention[..., None] * values[:, None]
    torch.testing.assert_close(out.slot_concept_weights, expected)
    assert out.slots.shape == (1, 3, 16)


def test_reference_linear_weight_is_transposed_on_load():
    book = build()
    weight = torch.randn(16, 96)
    book.load_reference_linear_weight(weight)
    torch.testing.assert_close(book.codebook, weight.t())
    with pytest.raises(ValueError, match=r"\(16, 96\)"):
        book.load_reference_linear_weight(torch.randn(96, 16))


def test_bad_shapes_are_refused_with_a_message():
    book = build()
    with pytest.raises(ValueError, match="indices and values"):
        book(torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="divisible"):
        build(codebook_dim=10, num_heads=4)
