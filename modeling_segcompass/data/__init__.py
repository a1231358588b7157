"""Data: what the model trains and evaluates on.

`synthetic` generates the synthetic world, `formats` loads the real datasets
(ReasonSeg, RefCOCO, ...) in one schema, `collator` batches rows for training.
"""
