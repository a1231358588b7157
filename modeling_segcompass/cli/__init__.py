"""Command line: the ``segcompass`` console script (demo, train-sae, sft, grpo, eval, ...).

The commands live in `commands`; ``python -m modeling_segcompass.cli`` runs `main`.
"""

from .commands import main

__all__ = ["main"]
