"""The ``convert-upstream`` command: an upstream SegCompass checkpoint
(github.com/ZhenyuLU-Heliodore/SegCompass) as a model folder of this package
(`assembly.upstream.convert_upstream_checkpoint`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CLIError, check_output_dir


def cmd_convert_upstream(args: argparse.Namespace) -> int:
    """`segcompass convert-upstream`: refseg_modules.pt + llm_hf/ + SAM .pth -> model folder."""
    from ..assembly.upstream import convert_upstream_checkpoint

    checkpoint = Path(args.checkpoint_dir)
    if not checkpoint.is_dir():
        raise CLIError(f"checkpoint_dir {str(checkpoint)!r} is not a folder.")
    output = Path(args.output_dir)
    check_output_dir(output, overwrite=args.overwrite, what="output_dir")
    if args.hook_layer is not None and args.hook_layer < 1:
        raise CLIError(f"--hook-layer must be >= 1, got {args.hook_layer}.")
    folder = convert_upstream_checkpoint(
        checkpoint,
        output,
        sam=args.sam,
        sae=args.sae,
        base_model=args.base_model,
        base=args.base,
        hook_layer=args.hook_layer,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(f"converted {checkpoint} into {folder}")
    print(
        "load it with AutoModel.from_pretrained(folder, trust_remote_code=True) and "
        "AutoProcessor.from_pretrained(folder, trust_remote_code=True)"
    )
    return 0


__all__ = ["cmd_convert_upstream"]
