"""Training: the stages that fit a SegCompass model, and their support.

VLM pretraining, SAE pretraining, supervised fine-tuning, GRPO with its rewards, and
atomic checkpointing / resume. Each module imports its trainer stack (trl, ...) itself.
"""
