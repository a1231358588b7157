"""pretrain_vlm (LM-only training on image descriptions) and image_dependence."""

import time

import pytest
import torch

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
from modeling_segcompass.data.synthetic import (
    SyntheticWorldConfig,
    describe_example,
    generate_examples,
    iter_texts,
)
from modeling_segcompass.processing_segcompass import SegCompassProcessor
from modeling_segcompass.training.vlm_pretraining import image_dependence, pretrain_vlm

WORLD = SyntheticWorldConfig(
    seed=0, kinds=("circle", "square", "triangle"), colours=("red", "green", "blue"), max_objects=3
)


@pytest.fixture(scope="module")
def setup():
    examples = [describe_example(e, WORLD) for e in generate_examples(WORLD, 96)]
    tokenizer = build_tiny_tokenizer(list(iter_texts(WORLD, 60, descriptions=True)), vocab_size=300)
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=WORLD.num_slots)
    return examples, processor, len(tokenizer)


def _model(vocab_size: int) -> SegCompassForReasoningSegmentation:
    torch.manual_seed(0)
    return SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=vocab_size))


def test_it_learns_the_descriptions_and_updates_only_the_vlm(setup):
    examples, processor, vocab = setup
    model = _model(vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = pretrain_vlm(
        model, examples, processor, max_steps=40, batch_size=8, warmup_steps=5,
        learning_rate=5e-3, progress=False,
    )  # fmt: skip
    assert report.steps == 40
    assert report.final_loss < 0.4 * report.first_loss, report
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("vlm.model.visual.") for k in changed)  # the vision tower learns
    assert any(k.startswith("vlm.model.language_model.") for k in changed)
    assert not [k for k in changed if not k.startswith("vlm.")]


def test_a_deadline_stops_it(setup):
    examples, processor, vocab = setup
    start = time.time()
    report = pretrain_vlm(
        _model(vocab), examples, processor, max_steps=100_000, deadline=start + 1.0,
        batch_size=4, progress=False,
    )  # fmt: skip
    assert 1 <= report.steps < 100_000 and time.time() - start < 10


def test_image_dependence_is_zero_without_image_information_and_not_otherwise(setup):
    examples, processor, vocab = setup
    model = _model(vocab)
    seeing = image_dependence(model, examples[:16], processor, batch_size=8)
    assert seeing.num_examples == 16 and abs(seeing.gap) > 1e-6  # a random VLM still sees
    same = [{**ex, "image": examples[0]["image"]} for ex in examples[:16]]
    assert image_dependence(model, same, processor, batch_size=8).gap == 0.0
    with torch.no_grad():  # blind the VLM: every image token becomes the same vector
        last = model.vlm.model.visual.merger.mlp[-1]
        last.weight.zero_()
        last.bias.zero_()
    assert image_dependence(model, examples[:16], processor, batch_size=8).gap == 0.0
    assert model.training  # a fresh model is in train mode and stays in it


def test_bad_arguments_fail_clearly(setup):
    examples, processor, vocab = setup
    model = _model(vocab)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        pretrain_vlm(model, examples, processor, max_steps=0, progress=False)
    with pytest.raises(ValueError, match="no examples"):
        pretrain_vlm(model, [], processor, max_steps=5, progress=False)
    with pytest.raises(ValueError, match="at least 2 examples"):
        image_dependence(model, examples[:1], processor)
