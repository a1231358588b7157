"""One transformers.Trainer step on the tiny model changes every trainable parameter."""

import torch
from transformers import Trainer, TrainingArguments

from tests.helpers import build_tiny_model, make_batch


def stack(examples):
    return {key: torch.cat([ex[key] for ex in examples]) for key in examples[0]}


def test_one_trainer_step_changes_every_trainable_parameter(tmp_path):
    model = build_tiny_model().train()
    config = model.config
    examples = []
    for i, objects in enumerate([[1], [2], [0], [3]]):
        ex = make_batch(config, [3], with_targets=True, num_objects=objects, seed=i)
        examples.append(ex)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-3,
        weight_decay=0.0,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=stack)
    trainer.train()
    # SAM's attention has no rotary embedding, so its key bias shifts every score of a query
    # equally: softmax cancels it and its gradient is zero by construction.
    exempt = {n for n in before if n.startswith("mask_decoder.") and n.endswith("k_proj.bias")}
    unchanged = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and n not in exempt and torch.equal(p, before[n])
    ]
    assert not unchanged, f"parameters that did not learn: {unchanged}"
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen_before[name]), name
    assert len(before) > 100
