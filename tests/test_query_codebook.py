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


def _every_row_reference(book, indices, values, mask):
    """Slots and slot-to-token attention with every encoder layer run on every row through
    `nn.TransformerEncoderLayer`'s own attention (weights from nn.MultiheadAttention)."""
    tokens = book.project(indices, values)
    batch = tokens.shape[0]
    hidden = torch.cat([book.slot_queries.expand(batch, -1, -1), tokens], dim=1)
    padding = torch.cat([torch.zeros(batch, book.num_slots, dtype=torch.bool), ~mask.bool()], 1)
    for layer in book.layers:
        normed = layer.norm1(hidden)
        out, weights = layer.self_attn(normed, normed, normed, key_padding_mask=padding)
        hidden = hidden + out
        hidden = hidden + layer._ff_block(layer.norm2(hidden))
    attention = weights[:, : book.num_slots, book.num_slots :]
    return book.final_norm(hidden[:, : book.num_slots]), attention / attention.sum(-1, True)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_last_layer_on_slot_rows_equals_the_layer_on_every_row_with_gradients(layers):
    torch.manual_seed(layers)
    book = build(num_layers=layers)
    indices, values = random_codes(batch=3, length=9)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    out = book(indices, values, mask)
    slots, attention = _every_row_reference(book, indices, values, mask)
    torch.testing.assert_close(out.slots, slots, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.slot_token_attention, attention, atol=1e-6, rtol=1e-5)
    target = torch.randn_like(slots)
    params = [p for p in book.parameters()]
    got = torch.autograd.grad((out.slots * target).sum(), params, allow_unused=True)
    want = torch.autograd.grad((slots * target).sum(), params, allow_unused=True)
    for (name, _), g, w in zip(book.named_parameters(), got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            scale = w.abs().max().clamp_min(1e-3)
            assert (g - w).abs().max() <= 1e-4 * scale, name


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


@pytest.mark.parametrize("pairs", [1, 3, 8])
def test_pair_readout_reads_at_most_m_pairs_and_its_weights_rebuild_the_slot(pairs):
    book = build(readout_pairs=pairs)
    indices, values = random_codes(batch=2, length=7, n=5)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    out = book(indices, values, mask)
    read = (out.slot_concept_weights != 0).flatten(2).sum(-1)  # (B, K) pairs each slot read
    assert read.max() <= pairs
    assert (read == pairs).all()  # enough active pairs: exactly m are read
    assert out.slot_concept_weights[1, :, 5:].abs().max() == 0  # padding is never read
    # exact decomposition: slot = pair_norm(pair_out(sum over pairs of weight x codebook row))
    rows = book.codebook[indices]  # (B, L, n, d_q)
    rebuilt = book.pair_norm(
        book.pair_out(torch.einsum("bkln,blnd->bkd", out.slot_concept_weights, rows))
    )
    torch.testing.assert_close(out.slots, rebuilt)
    torch.testing.assert_close(out.slot_token_attention.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_readout_removing_the_read_pairs_changes_the_slot_and_others_barely_do(seed):
    torch.manual_seed(seed)
    book = build(readout_pairs=2)
    indices = torch.arange(40).reshape(1, 8, 5)  # every latent once: removal = one pair
    values = torch.rand(1, 8, 5) + 0.5
    out = book(indices, values)
    read = out.slot_concept_weights[0, 0] != 0  # (L, n)
    removed = values.clone()
    removed[0][read] = 0
    moved_read = (book(indices, removed).slots[0, 0] - out.slots[0, 0]).norm()
    other = (~read).nonzero()[:2]
    removed = values.clone()
    removed[0, other[:, 0], other[:, 1]] = 0
    after = book(indices, removed)
    assert torch.equal(after.slot_concept_weights[0, 0] != 0, read)  # the same two pairs read
    moved_other = (after.slots[0, 0] - out.slots[0, 0]).norm()
    assert moved_read > 1.0 and moved_other < 0.1 * moved_read


def test_pair_readout_trains_and_a_slot_with_no_active_pair_is_empty():
    book = build(readout_pairs=4).train()
    indices, values = random_codes()
    out = book(indices, values)
    out.slots.square().sum().backward()
    for name in ("pair_query.weight", "pair_key.weight", "pair_out.weight", "codebook"):
        grad = dict(book.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    empty = book(indices, torch.zeros_like(values))
    assert torch.isfinite(empty.slots).all()
    assert empty.slot_concept_weights.abs().max() == 0


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "8"])
def test_pair_readout_refuses_bad_counts(bad):
    with pytest.raises(ValueError, match="readout_pairs"):
        build(readout_pairs=bad)


def test_config_field_builds_the_pair_readout_and_the_paper_presets_keep_it_off(tmp_path):
    from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
    from tests.helpers import build_tiny_model, make_batch

    assert SegCompassConfig.upstream().codebook_readout_pairs is None
    assert SegCompassConfig.paper().codebook_readout_pairs is None
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="codebook_readout_pairs"):
            SegCompassConfig.tiny(codebook_readout_pairs=bad)
    model = build_tiny_model(codebook_readout_pairs=6)
    assert model.codebook.readout_pairs == 6
    batch = make_batch(model.config, [3, 2], with_targets=True)
    out = model(**batch)
    assert (out.slot_concept_weights != 0).flatten(2).sum(-1).max() <= 6
    out.loss.backward()
    assert model.codebook.pair_out.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    reloaded = SegCompassForReasoningSegmentation.from_pretrained(tmp_path).eval()
    assert reloaded.config.codebook_readout_pairs == 6
    with torch.no_grad():
        again = reloaded(**batch)
        model.eval()
        first = model(**batch)
    torch.testing.assert_close(again.mask_logits, first.mask_logits)


def test_slot_mapper_without_ref_input_ignores_the_ref_states():
    from modeling_segcompass import SegCompassConfig
    from tests.helpers import build_tiny_model, make_batch

    assert SegCompassConfig.upstream().slot_mapper_ref_input is True
    assert SegCompassConfig.paper().slot_mapper_ref_input is True
    with pytest.raises(ValueError, match="slot_mapper_ref_input"):
        SegCompassConfig.tiny(slot_mapper_ref_input="no")
    batch = make_batch(build_tiny_model().config, [3, 2])
    calls = []
    for ref_input in (True, False):
        model = build_tiny_model(slot_mapper_ref_input=ref_input)
        hook = model.slot_mapper.register_forward_hook(lambda m, i, o: calls.append(i[1]))
        with torch.no_grad():
            out = model(**batch)
        hook.remove()
        assert out.ref_hidden_states.abs().sum() > 0  # the output still reports the states
    assert calls[0].abs().sum() > 0 and calls[1].abs().sum() == 0


def test_codebook_token_mask_reads_the_span_after_the_last_start_token():
    from types import SimpleNamespace

    from modeling_segcompass.query_codebook import codebook_token_mask

    ids = torch.tensor(
        [
            [1, 5, 2, 5, 3, 4, 8, 9, 0],  # the last 5 opens the span; it ends at </think> (8)
            [1, 2, 3, 8, 9, 0, 0, 0, 0],  # no 5: read whole
            [1, 5, 8, 9, 0, 0, 0, 0, 0],  # nothing between 5 and </think>: read whole
            [1, 5, 3, 4, 0, 0, 0, 0, 0],  # no stop: up to the padding
            [5, 3, 9, 4, 8, 0, 0, 0, 0],  # <REF_POS> (9) stops it too
        ]
    )
    attention = torch.tensor([[1] * 8 + [0], [1] * 5 + [0] * 4, [1] * 4 + [0] * 5,
                              [1] * 4 + [0] * 5, [1] * 5 + [0] * 4])  # fmt: skip
    config = SimpleNamespace(
        codebook_span_start_token_id=5,
        codebook_span_end_token_ids=None,
        think_end_token_id=8,
        ref_token_id=9,
    )
    mask = codebook_token_mask(config, ids, attention)
    expected = torch.zeros_like(mask)
    expected[0, 4:6] = True
    expected[1] = attention[1].bool()
    expected[2] = attention[2].bool()
    expected[3, 2:4] = True
    expected[4, 1] = True
    assert torch.equal(mask, expected)
    config.codebook_span_end_token_ids = [4, 8]  # 4 ends it too; <REF_POS> no longer does
    mask = codebook_token_mask(config, ids, attention)
    expected[0, 5] = False
    expected[3, 3] = False
    expected[4, 1:3] = True
    assert torch.equal(mask, expected)
    config.codebook_span_start_token_id = None  # the paper: every unpadded token
    assert torch.equal(codebook_token_mask(config, ids, attention), attention.bool())


def test_codebook_span_slots_depend_only_on_the_concepts_of_the_span():
    from modeling_segcompass import SegCompassConfig
    from tests.helpers import build_tiny_model, make_batch

    assert SegCompassConfig.upstream().codebook_span_start_token_id is None
    assert SegCompassConfig.paper().codebook_span_start_token_id is None
    with pytest.raises(ValueError, match="codebook_span_start_token_id"):
        SegCompassConfig.tiny(codebook_span_start_token_id="answer")
    for ends in ([], ["</think>"], 8):
        with pytest.raises(ValueError, match="codebook_span_end_token_ids"):
            SegCompassConfig.tiny(codebook_span_end_token_ids=ends)
    tuple_ends = SegCompassConfig.tiny(codebook_span_end_token_ids=(8, 9))
    assert tuple_ends.codebook_span_end_token_ids == [8, 9]
    # make_sequence's response: <think> 60 61 62 63 64 </think> <REF_POS>...: the span is 63, 64
    batch = make_batch(build_tiny_model().config, [3, 2])
    span = (batch["input_ids"] == 63) | (batch["input_ids"] == 64)

    def outside_removed(indices, values):
        return indices, values * span.unsqueeze(-1).to(values.dtype)

    def inside_removed(indices, values):
        return indices, values * (~span).unsqueeze(-1).to(values.dtype)

    for start, outside_matters in ((62, False), (None, True)):
        model = build_tiny_model(codebook_span_start_token_id=start)
        with torch.no_grad():
            plain = model(**batch)
            outside = model(**batch, edit_concepts=outside_removed)
            inside = model(**batch, edit_concepts=inside_removed)
        moved = not torch.equal(outside.mask_logits, plain.mask_logits)
        assert moved is outside_matters
        assert not torch.equal(inside.mask_logits, plain.mask_logits)
        if start is not None:
            assert plain.slot_token_attention[~span.unsqueeze(1).expand_as(
                plain.slot_token_attention)].abs().max() == 0  # fmt: skip
            assert plain.slot_concept_weights[:, :, ~span[0]].abs().max() == 0


def test_word_token_ids_turns_a_config_word_into_its_token_id():
    from modeling_segcompass.assembly.tokenizer_builder import word_token_ids
    from tests.helpers import build_tiny_tokenizer_and_processor

    tokenizer, _ = build_tiny_tokenizer_and_processor()
    (answer,) = tokenizer(" answer", add_special_tokens=False)["input_ids"]
    resolved = word_token_ids(
        {"codebook_span_start_token_id": "answer", "codebook_dim": 8}, tokenizer
    )
    assert resolved == {"codebook_span_start_token_id": answer, "codebook_dim": 8}
    assert word_token_ids({"codebook_span_start_token_id": 7}, tokenizer) == {
        "codebook_span_start_token_id": 7
    }
    # a token as the vocabulary spells it, where the word after a space is not one token
    ends = word_token_ids({"codebook_span_end_token_ids": ["</think>", 9, "Ġ"]}, tokenizer)
    assert ends["codebook_span_end_token_ids"] == [
        tokenizer.convert_tokens_to_ids("</think>"), 9, tokenizer.convert_tokens_to_ids("Ġ")
    ]  # fmt: skip
    with pytest.raises(ValueError, match="codebook_span_start_token_id: 'xqzv' is neither"):
        word_token_ids({"codebook_span_start_token_id": "xqzv"}, tokenizer)
