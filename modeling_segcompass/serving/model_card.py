"""The model card of an export: metadata, usage snippets that run as written, the run's facts.

`build_model_card` writes the card `serving.hub.export` saves as ``README.md``: Hub metadata
(license, tags, base models, datasets, ``model-index`` with exactly the metrics given),
usage, architecture, training recipe, evaluation table, interpretability, serving,
limitations and citation. `EvaluationReport` normalises the metrics; `extract_python_blocks`
returns the card's code so that a test can run it.

Library side: uses huggingface_hub; never imported by the remote-code files.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CARD_TAGS = (
    "custom_code",
    "reasoning-segmentation",
    "segcompass",
    "sparse-autoencoder",
    "interpretability",
    "image-segmentation",
)
#: The Hub metadata's ``pipeline_tag``. For a transformers model whose tag is one of the tasks
#: of transformers' own pipelines (image-segmentation among them), the Hub's "Use this model"
#: code calls ``pipeline("<tag>", model=...)``, and that standard pipeline cannot run this
#: model: it takes an instruction and is the custom ``reasoning-segmentation`` pipeline. For a
#: tag outside that list the Hub shows only the AutoProcessor / AutoModel lines, which load
#: the model. "image-text-to-image" is such a tag, and says what the model does: an image and
#: an instruction in, masks out.
PIPELINE_TAG = "image-text-to-image"
DEFAULT_INSTRUCTION = "the red square"
#: Generation budget of the card's snippets (the default of `model.segment`); an export can
#: give its model's own (it must cover the reasoning plus the `<REF_POS>` tokens).
DEFAULT_MAX_NEW_TOKENS = 64
CITATION = """@inproceedings{segcompass2026,
  title     = {SegCompass: Exploring Interpretable Alignment with Sparse Autoencoders for
               Enhanced Reasoning Segmentation},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern
               Recognition (CVPR)},
  year      = {2026},
  note      = {arXiv:2605.22658}
}"""


_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
#: The metrics of `evaluation.metrics` (paper names), kept in the card whatever their number type.
METRIC_NAMES = ("gIoU", "cIoU", "N-acc", "T-acc")


@dataclass
class EvaluationReport:
    """Evaluation numbers for the card, normalised from a dict or a `MetricsResult`.

    Attributes:
        overall: metric name -> value (fractions in [0, 1], e.g. ``{"gIoU": 0.61}``).
        per_group: group (query family / split) -> metric name -> value.
        dataset_name, dataset_type, split: what the numbers were measured on.
    """

    overall: dict[str, float]
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)
    dataset_name: str = "evaluation set"
    dataset_type: str = "custom"
    split: str | None = None

    @staticmethod
    def _metrics(values: Mapping[str, Any]) -> dict[str, float]:
        # Metrics are real numbers (Python or numpy floats); other ints are sample counts, and
        # None means undefined (e.g. N-acc without no-target samples). A metric of
        # `METRIC_NAMES` counts whatever its number type: a T-acc of 1 written as an int.
        out = {}
        for key, value in values.items():
            if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if isinstance(value, numbers.Integral) and str(key) not in METRIC_NAMES:
                continue
            out[str(key)] = float(value)
        return out

    @classmethod
    def from_any(
        cls,
        evaluation: Any,
        *,
        dataset_name: str = "evaluation set",
        dataset_type: str = "custom",
        split: str | None = None,
    ) -> EvaluationReport:
        """Accept ``{"gIoU": .., "cIoU": ..}``, ``{"overall": {...}, "per_family": {...}}``
        (`MetricsResult.to_dict()`) or a `MetricsResult`."""
        if isinstance(evaluation, EvaluationReport):
            return evaluation
        if hasattr(evaluation, "to_dict"):
            evaluation = evaluation.to_dict()
        if not isinstance(evaluation, Mapping):
            raise TypeError(
                "Expected evaluation as a dict of metric values, a MetricsResult or its "
                f"to_dict(), got {type(evaluation).__name__}."
            )
        if "overall" in evaluation:
            overall = cls._metrics(evaluation["overall"])
            groups = evaluation.get("per_family") or {}
            per_group = {str(name): cls._metrics(values) for name, values in groups.items()}
        else:
            overall, per_group = cls._metrics(evaluation), {}
        if not overall:
            raise ValueError(
                f"The evaluation holds no metric value (float); got keys {sorted(evaluation)}."
            )
        return cls(overall, per_group, dataset_name, dataset_type, split)


# --------------------------------------------------------------------------- the card
def _literal(text: str) -> str:
    """``text`` as a Python string literal (double quotes; quotes and backslashes escaped)."""
    return json.dumps(text)


def is_local_folder(model_id: str) -> bool:
    """Whether ``model_id`` names an existing folder (then `from_pretrained` reads it, not the Hub)."""
    return os.path.isdir(model_id)


def _image_code(model_id: str, example_image: str | None) -> tuple[list[str], list[str]]:
    """(import lines, lines that set ``image``) for the snippets.

    With ``example_image`` (a file of the model folder / repo) the snippets open that file:
    from the folder when ``model_id`` is one, else downloaded from the Hub repo. Without it
    they draw an image, so that they still run as written.
    """
    if example_image is None:
        return [], [
            "# any RGB image works; this one is drawn here so the snippet runs as is",
            'image = Image.new("RGB", (64, 64), "white")',
            "image.paste((220, 30, 30), (16, 16, 40, 40))",
        ]
    if is_local_folder(model_id):
        path = _literal(os.path.join(model_id, example_image))
        return [], [f'image = Image.open({path}).convert("RGB")  # the example image of the model']
    return ["from huggingface_hub import hf_hub_download"], [
        f"image = Image.open(hf_hub_download({_literal(model_id)}, {_literal(example_image)}))"
        '.convert("RGB")  # the example image of the model'
    ]


def usage_snippet(
    repo_id: str,
    instruction: str = DEFAULT_INSTRUCTION,
    *,
    example_image: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> str:
    """Python that loads the model from ``repo_id`` (a Hub id or a folder) and segments the
    example image (`_image_code`) by ``instruction``.

    It runs as written; the card test executes it.
    """
    imports, image_lines = _image_code(repo_id, example_image)
    lines = [
        *imports,
        "from PIL import Image",
        "from transformers import pipeline",
        "",
        f"pipe = pipeline(model={_literal(repo_id)}, trust_remote_code=True)",
        "",
        *image_lines,
        "",
        f"out = pipe(image, {_literal(instruction)}, max_new_tokens={int(max_new_tokens)})",
        'print(out["text"])  # "<think> ... </think> <REF_POS>"',
        'print(out["scores"], [mask.shape for mask in out["masks"]])  # bool masks at the image size',
        'print(out["reason"])  # why there is no mask, if there is none',
        'for slot in out["concept_trace"]:  # which SAE concepts each slot used, and where they fired',
        '    print(slot["slot"], slot["kept"], [(c["id"], c["tokens"][0]["token"]) for c in slot["concepts"][:3]])',
    ]
    return "\n".join(lines)


def lower_level_snippet(
    repo_id: str,
    instruction: str = DEFAULT_INSTRUCTION,
    *,
    example_image: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> str:
    """Python using `AutoModel` / `AutoProcessor` and `model.segment` directly."""
    imports, image_lines = _image_code(repo_id, example_image)
    lines = [
        *imports,
        "from PIL import Image",
        "from transformers import AutoModel, AutoProcessor",
        "",
        f"model = AutoModel.from_pretrained({_literal(repo_id)}, trust_remote_code=True).eval()",
        f"processor = AutoProcessor.from_pretrained({_literal(repo_id)}, trust_remote_code=True)",
        "",
        *(line for line in image_lines if not line.startswith("#")),
        f"result = model.segment([image], [{_literal(instruction)}], processor=processor, "
        f"max_new_tokens={int(max_new_tokens)})[0]",
        "print(result.text, result.masks.shape, result.scores)",
    ]
    return "\n".join(lines)


def _format_number(value: float) -> str:
    return f"{100.0 * value:.2f}"


def _evaluation_section(report: EvaluationReport | None) -> str:
    if report is None:
        return (
            "## Evaluation\n\nNo evaluation numbers were given when this card was written; "
            "evaluate with `modeling_segcompass.evaluation.metrics` before relying on the model.\n"
        )
    names = list(report.overall)
    for metrics in report.per_group.values():
        names += [n for n in metrics if n not in names]
    lines = [
        "## Evaluation",
        "",
        f"Measured on **{report.dataset_name}**"
        + (f" (split `{report.split}`)" if report.split else "")
        + ", in percent. gIoU is the mean per-sample IoU, cIoU the summed intersection over "
        "the summed union (LISA's convention); N-acc / T-acc are the shares of no-target / "
        "target samples predicted empty / non-empty.",
        "",
        "| group | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    rows = [*report.per_group.items(), ("overall", report.overall)]
    for group, metrics in rows:
        cells = [_format_number(metrics[n]) if n in metrics else "-" for n in names]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _training_section(training: Mapping[str, Any] | str | None) -> str:
    head = "## Training recipe\n\n"
    if training is None:
        return head + "Not recorded.\n"
    if isinstance(training, str):
        return head + training.strip() + "\n"
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in training.items()]
    return head + "\n".join(lines) + "\n"


def _architecture_summary(config: Any) -> str:
    text = config.vlm_text_config
    return (
        f"- VLM: `{config.vlm_config.model_type}` (text hidden {text.hidden_size}, "
        f"{text.num_hidden_layers} layers, vocabulary {text.vocab_size})\n"
        f"- SAE on the output of decoder layer {config.sae_layer}: {config.sae_architecture}, "
        f"d_sae {config.d_sae}"
        + (f", k {config.sae_k}" if config.sae_architecture == "topk" else "")
        + "\n"
        f"- Query codebook: width {config.codebook_dim}, {config.codebook_layers} layers, "
        f"{config.codebook_heads} heads; K = {config.num_slots} slots\n"
        f"- Image encoder: `{config.image_encoder_type}`; SAM prompt encoder + mask decoder of "
        f"width {config.image_embedding_channels}; masks {config.mask_size}x{config.mask_size} "
        "before resizing to the image\n"
    )


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repo id (``owner/name``, or a bare ``name``) rather than
    a local path or a description. The card's metadata keeps only those (the Hub refuses a
    card whose ``base_model`` is not a repo id); the body lists every source."""
    return bool(_HUB_ID.fullmatch(name)) and not os.path.exists(name)


def _source_list(names: Sequence[str], url: str) -> str:
    """Markdown list of base models / datasets, Hub ids linked; "none recorded" when empty."""
    if not names:
        return "- none recorded"
    return "\n".join(f"- [`{n}`]({url}{n})" if is_hub_id(n) else f"- `{n}`" for n in names)


def _space_instructions(model_id: str, local: bool) -> str:
    """How to run the Gradio app for a model loaded from ``model_id``."""
    if local:
        app = os.path.join(model_id, "app.py")
        return (
            f"`python {app}` serves this folder (`pip install gradio` first). For a Space, "
            "push the folder to the Hub, copy `app.py` and `requirements.txt` into a Gradio "
            "Space and set `SEGCOMPASS_MODEL` to the model's repo id (exporting with that "
            "`repo_id` writes it into this card and `app.py`)."
        )
    return (
        f"Copy `app.py` and `requirements.txt` into a Gradio Space: it serves `{model_id}` "
        "(set `SEGCOMPASS_MODEL` to serve another) and downloads the example and the concept "
        "labels from that repo."
    )


def build_model_card(
    config: Any,
    *,
    repo_id: str,
    license: str = "apache-2.0",
    base_models: Sequence[str] = (),
    datasets: Sequence[str] = (),
    evaluation: Any = None,
    eval_dataset_name: str = "evaluation set",
    eval_dataset_type: str = "custom",
    eval_split: str | None = None,
    training: Mapping[str, Any] | str | None = None,
    limitations: str | None = None,
    toy: bool = False,
    instruction: str = DEFAULT_INSTRUCTION,
    example_image: str | None = None,
    example_note: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    widget_image_url: str | None = None,
    extra_tags: Sequence[str] = (),
    model_name: str | None = None,
) -> ModelCard:
    """The model card of a SegCompass model, from the run's facts.

    Args:
        config: the model's `SegCompassConfig` (architecture summary).
        repo_id: where users load the model from: the Hub id it is published under, or the
            folder it sits in (an existing folder). The usage snippets and the serving
            instructions load it from there.
        license: an SPDX-like Hub license id.
        base_models: Hub ids of the VLM / SAM / SAE the model was assembled from (other
            names, e.g. local paths, are listed in the text but left out of the metadata).
        datasets: Hub ids (or names) of the training data (the same rule).
        evaluation: metrics as `EvaluationReport.from_any` accepts them; they go to the
            card metadata (``model-index``) and to a table. Never invented: without it the
            card says there are no numbers.
        eval_dataset_name, eval_dataset_type, eval_split: what the numbers were measured on.
        training: the recipe, as a settings dict (rendered as a table) or markdown.
        limitations: markdown; default text depends on ``toy``.
        toy: the tiny embedded-default model trained on synthetic shapes.
        instruction: the example instruction (snippets and widget).
        example_image: the file of the model folder / repo that holds the example image
            (`export` writes ``example.png``); the snippets open it. None: they draw one.
        example_note: markdown saying what the example is (shown above the usage).
        max_new_tokens: the snippets' generation budget (enough for the model's reasoning
            and its `<REF_POS>` tokens).
        widget_image_url: an example image URL for the widget metadata (default: the
            example image in the Hub repo, when ``repo_id`` is a Hub id).
        extra_tags: more Hub tags.
        model_name: display name (default: the last part of ``repo_id``).
    """
    report = (
        None
        if evaluation is None
        else EvaluationReport.from_any(
            evaluation,
            dataset_name=eval_dataset_name,
            dataset_type=eval_dataset_type,
            split=eval_split,
        )
    )
    name = model_name or repo_id.rstrip("/").split("/")[-1]
    tags = list(
        dict.fromkeys([*CARD_TAGS, *(("toy", "synthetic-data") if toy else ()), *extra_tags])
    )
    eval_results = None
    if report is not None:
        eval_results = [
            EvalResult(
                task_type="image-segmentation",
                task_name="Reasoning segmentation",
                dataset_type=report.dataset_type,
                dataset_name=report.dataset_name,
                dataset_split=report.split,
                metric_type=metric,
                metric_name=metric,
                metric_value=round(value, 6),
            )
            for metric, value in report.overall.items()
        ]
    local = is_local_folder(repo_id)
    if widget_image_url is None and example_image is not None and not local:
        widget_image_url = f"https://huggingface.co/{repo_id}/resolve/main/{example_image}"
    widget: dict[str, Any] = {"text": instruction}
    if widget_image_url:
        widget["src"] = widget_image_url
    snippet_args = {"example_image": example_image, "max_new_tokens": max_new_tokens}
    data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        base_model=[b for b in base_models if is_hub_id(b)] or None,
        datasets=[d for d in datasets if is_hub_id(d)] or None,
        eval_results=eval_results,
        model_name=name,
        widget=[widget],
    )
    if limitations is None:
        limitations = (
            "- **This is a toy model.** It is the tiny embedded default (about half a million "
            "parameters) trained on a synthetic world of coloured shapes on a plain canvas. "
            "It does not segment natural images and its instructions are limited to that "
            "world's vocabulary; use it to try the code path, not for results.\n"
            if toy
            else ""
        ) + (
            "- The chain of thought can name the wrong object; the mask then follows the "
            "wrong reasoning. Check the `text` and the concept trace.\n"
            "- A completion without `<REF_POS>` tokens yields no mask (`reason` says so).\n"
            "- Concepts are SAE latents: their meaning is inferred from the tokens they fire "
            "on, not guaranteed, and the trace shows correlation, not proof of causation "
            "(use concept ablation for causal checks).\n"
            "- The Hub's inference widget cannot run custom code: use the pipeline, the "
            "Inference Endpoint handler or the Gradio app below.\n"
        )
    base_list = _source_list(base_models, "https://huggingface.co/")
    data_list = _source_list(datasets, "https://huggingface.co/datasets/")
    body = f"""
# {name}

SegCompass (arXiv:2605.22658) for **reasoning segmentation**: given an image and an implicit
instruction, a vision-language model writes its reasoning in `<think> ... </think>` followed
by `<REF_POS>` tokens; a sparse autoencoder exposes the concepts in its hidden states; a query
codebook gathers them into one slot per object; each slot, fused with its `<REF_POS>` state,
points SAM's mask decoder at the object.

Built with the `modeling_segcompass` package; the model ships its code (remote code), so
only `torch` and `transformers` are needed to use it.

## Usage

{(example_note.strip() + chr(10) + chr(10)) if example_note else ""}```python
{usage_snippet(repo_id, instruction, **snippet_args)}
```

Lower level, with the model and processor:

```python
{lower_level_snippet(repo_id, instruction, **snippet_args)}
```

**Which call.** The pipeline of this model is the custom `reasoning-segmentation` pipeline,
shipped with it: `pipeline(model=..., trust_remote_code=True)` reads it from `config.json`
(naming it works too: `pipeline("reasoning-segmentation", model=..., trust_remote_code=True)`).
The standard `pipeline("image-segmentation", ...)` cannot run this model: it takes no
instruction. The metadata says `pipeline_tag: {PIPELINE_TAG}` (an image and an instruction
in, masks out), so that the Hub's "Use this model" code loads the model with `AutoProcessor` /
`AutoModel`; call `model.segment` as above.

The output of the pipeline: `masks` (a list of `(H, W)` bool arrays, one per object found),
`scores` (their confidences), `text` (the generated chain of thought and answer), `reason`
(why there is no mask, if none), and `concept_trace`.

## Model

{_architecture_summary(config)}
Base models:
{base_list}

Training data:
{data_list}

{_training_section(training)}
{_evaluation_section(report)}
## Interpretability

Every mask can be traced back through the model. `concept_trace` lists, for each slot, the
SAE concepts (latent ids) it drew on most, with the weight the codebook gave them and the
tokens (image patches, instruction or reasoning words) on which they fired. The heatmap of a
slot (`return_heatmaps=True`) shows where it pointed before SAM refined the mask. With the
`modeling_segcompass` package, `interpret.ablation.ablate_concepts` removes concepts with everything
else frozen and measures how the mask changes.

## Serving

The Hub widget does not run custom code (metadata is kept for discovery). To serve:

- **Inference Endpoint**: this repository contains `handler.py` (`EndpointHandler`) and
  `requirements.txt`. Send `{{"inputs": {{"image": "<base64>", "instruction": "..."}}}}`;
  masks come back as COCO run-length encoding.
- **Space**: `app.py` is a Gradio app (image upload, instruction, mask overlay, chain of
  thought, concept trace with image patches as `patch(row,col)` and the concept labels of
  `concept_labels.json`, the model's example as a ready input). {_space_instructions(repo_id, local)}

## Limitations

{limitations.strip()}

## Citation

```bibtex
{CITATION}
```
"""
    content = f"---\n{data.to_yaml()}\n---\n{body.lstrip()}"
    return ModelCard(content)


def extract_python_blocks(card_text: str) -> list[str]:
    """The fenced ```python blocks of a card, in order (for running its usage as a test)."""
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.DOTALL)


__all__ = [
    "CARD_TAGS",
    "CITATION",
    "DEFAULT_INSTRUCTION",
    "EvaluationReport",
    "PIPELINE_TAG",
    "build_model_card",
    "extract_python_blocks",
    "lower_level_snippet",
    "usage_snippet",
]
