"""The ``export`` command: a Hub-ready folder from a model folder (`serving.hub.export`), with
the metrics of an ``eval`` JSON in its model card."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import CLIError, check_output_dir
from .model_folder import load_model


def cmd_export(args: argparse.Namespace) -> int:
    """`segcompass export`: a Hub-ready folder (`hub.export`)."""
    from ..serving.hub import export, upload_command

    output = Path(args.output)
    check_output_dir(output, overwrite=args.overwrite)
    evaluation = None
    eval_name = args.eval_name
    if args.eval_json:
        path = Path(args.eval_json)
        if not path.is_file():
            raise CLIError(f"--eval-json {str(path)!r}: no such file.")
        try:
            evaluation = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise CLIError(f"--eval-json {str(path)!r} is not valid JSON ({error}).") from error
        if not isinstance(evaluation, dict):
            raise CLIError(f"--eval-json {str(path)!r} must hold a JSON object of metrics.")
        if eval_name is None and isinstance(evaluation.get("data"), str):
            eval_name = evaluation["data"]
    loaded = load_model(args.model, device="cpu")
    extra = [loaded.folder / "concept_labels.json"]
    extra = [p for p in extra if p.is_file()] + [Path(p) for p in args.extra_file]
    for path in extra:
        if not path.is_file():
            raise CLIError(f"--extra-file {str(path)!r}: no such file.")
    repo_id = args.repo_id  # None: the card and app.py load the model from the folder
    model = loaded.model
    del model.processor  # the export saves the processor itself
    result = export(
        model,
        loaded.processor,
        output,
        repo_id=repo_id,
        overwrite=args.overwrite,
        include_serving=not args.no_serving,
        extra_files=extra,
        license=args.license,
        base_models=args.base_model,
        datasets=args.dataset,
        evaluation=evaluation,
        eval_dataset_name=eval_name or "evaluation set",
        toy=args.toy,
    )
    named = f"repo id {repo_id}" if repo_id else "no --repo-id: the card loads this folder"
    print(f"exported {len(result.files)} files to {result.folder} ({named}):")
    print("  " + ", ".join(result.files))
    if repo_id:
        print(f"push with: {upload_command(result.folder, repo_id)}")
    else:
        print(
            "to publish: export again with --repo-id NAME (the card and app.py then load "
            f"NAME), then: {upload_command(result.folder, 'NAME')}"
        )
    return 0


__all__ = ["cmd_export"]
