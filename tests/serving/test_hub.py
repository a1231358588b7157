"""Hub export: the folder works without the package, the card parses and its usage runs,
push uploads the folder, the endpoint handler and the Gradio app work locally."""

from __future__ import annotations

import base64
import inspect
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import pipeline

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.pipeline_segcompass import TASK
from modeling_segcompass.serving.endpoint_handler import EndpointHandler, mask_to_rle, rle_to_mask
from modeling_segcompass.serving.hub import (
    EvaluationReport,
    build_model_card,
    export,
    extract_python_blocks,
    push_to_hub,
)
from modeling_segcompass.serving.space_app import (
    PALETTE,
    build_demo,
    overlay_masks,
    segment_for_demo,
)
from tests.helpers import HIDE_PACKAGE, build_tiny_tokenizer_and_processor, force_answer

REPO_ID = "segcompass-tests/tiny-synthetic"
EVALUATION = {
    "overall": {"gIoU": 0.4123, "cIoU": 0.5, "N-acc": None, "T-acc": 1.0, "n": 12},
    "per_family": {"attribute": {"gIoU": 0.6, "cIoU": 0.55, "n": 6}},
    "empty_iou": 1.0,
}
FORCE_REFS = {"prefix_allowed_tokens_fn": force_answer(3)}  # a well-formed answer, K = 3


@pytest.fixture(scope="module")
def parts():
    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    return model.eval(), processor


@pytest.fixture(scope="module")
def exported(parts, tmp_path_factory):
    model, processor = parts
    folder = tmp_path_factory.mktemp("export") / "model"
    return export(
        model,
        processor,
        folder,
        repo_id=REPO_ID,
        toy=True,
        base_models=["Qwen/Qwen2.5-VL-7B-Instruct"],
        datasets=["synthetic-shapes"],
        evaluation=EVALUATION,
        eval_dataset_name="SegCompass synthetic world",
        eval_split="test",
        training={"stages": "SAE pretraining, supervised warm-up, GRPO", "steps": 300},
    )


@pytest.fixture(scope="module")
def exported_here(parts, tmp_path_factory):
    """An export without a repo id: its card loads the model from the folder (runs offline)."""
    model, processor = parts
    folder = tmp_path_factory.mktemp("export-here") / "model"
    picture = np.random.default_rng(11).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return export(model, processor, folder, example=(picture, "the red square"), toy=True)


# Pipeline tags for which the Hub's "Use this model" button writes
# `pipeline("<tag>", model=..., trust_remote_code=True)` for a transformers model (the
# transformers entry of the Hub's library-to-tasks table, huggingface.js); for any other tag
# it writes only the AutoProcessor / AutoModel lines.
HUB_PIPELINE_SNIPPET_TAGS = {
    "audio-classification", "automatic-speech-recognition", "depth-estimation",
    "document-question-answering", "feature-extraction", "fill-mask", "image-classification",
    "image-feature-extraction", "image-segmentation", "image-to-image", "image-to-text",
    "image-text-to-text", "mask-generation", "object-detection", "question-answering",
    "summarization", "table-question-answering", "text-classification", "text-generation",
    "text-to-audio", "text-to-speech", "token-classification", "translation",
    "video-classification", "visual-question-answering", "zero-shot-classification",
    "zero-shot-image-classification", "zero-shot-object-detection",
}  # fmt: skip


def hub_use_this_model_snippets(pipeline_tag: str, model_id: str) -> list[str]:
    """The code the Hub shows under "Use this model" for a custom-code transformers model."""
    snippets = [
        "from transformers import AutoProcessor, AutoModel\n\n"
        f'processor = AutoProcessor.from_pretrained("{model_id}", trust_remote_code=True)\n'
        f'model = AutoModel.from_pretrained("{model_id}", trust_remote_code=True, '
        'device_map="auto")\n'
    ]
    if pipeline_tag in HUB_PIPELINE_SNIPPET_TAGS:
        snippets.insert(
            0,
            "from transformers import pipeline\n\n"
            f'pipe = pipeline("{pipeline_tag}", model="{model_id}", trust_remote_code=True)\n',
        )
    return snippets


@pytest.fixture(scope="module")
def pipe(parts):
    model, processor = parts
    return pipeline(TASK, model=model, processor=processor)


def test_export_writes_a_complete_folder(exported):
    folder = exported.folder
    for name in (
        "config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
        "README.md", "handler.py", "app.py", "requirements.txt", "configuration_segcompass.py",
        "modeling_segcompass.py", "processing_segcompass.py", "pipeline_segcompass.py",
    ):  # fmt: skip
        assert name in exported.files, name
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in exported.files)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"] == (
        "pipeline_segcompass.ReasoningSegmentationPipeline"
    )
    assert config["auto_map"]["AutoModel"].endswith("SegCompassForReasoningSegmentation")
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == (
        "processing_segcompass.SegCompassProcessor"
    )
    assert f"DEFAULT_MODEL_ID = {REPO_ID!r}" in (folder / "app.py").read_text()
    for path in folder.glob("*.py"):  # the export never needs the package
        text = path.read_text()
        assert "import modeling_segcompass" not in text and "from modeling_segcompass" not in text


def test_export_refuses_a_non_empty_folder(parts, tmp_path):
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export(*parts, tmp_path, repo_id=REPO_ID)


def test_export_without_a_repo_id_names_the_folder_everywhere(parts, tmp_path):
    """No made-up repo id: the snippets, app.py and the Space instructions load the folder."""
    result = export(*parts, tmp_path / "model", toy=True)
    folder = str((tmp_path / "model").resolve())
    assert result.repo_id is None
    card = (tmp_path / "model" / "README.md").read_text()
    app = (tmp_path / "model" / "app.py").read_text()
    for text in (card, app):
        assert "local/" not in text
    assert f"DEFAULT_MODEL_ID = {folder!r}" in app
    blocks = extract_python_blocks(card)
    assert len(blocks) == 2 and all(f'"{folder}"' in block for block in blocks)
    assert f"`python {folder}/app.py` serves this folder" in card
    # the drawn placeholder example is written and marked as such
    assert "example.png" in result.files and "is drawn" in card


def test_export_shows_the_example_it_is_given(parts, tmp_path):
    picture = np.random.default_rng(7).integers(0, 256, (24, 36, 3), dtype=np.uint8)
    instruction = "the shape you would roll down a hill"
    result = export(*parts, tmp_path / "model", repo_id=REPO_ID, example=(picture, instruction),
                    max_new_tokens=80)  # fmt: skip
    folder = result.folder
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "example.png")), picture)
    card = ModelCard.load(folder / "README.md")
    url = f"https://huggingface.co/{REPO_ID}/resolve/main/example.png"
    assert card.data.widget == [{"text": instruction, "src": url}]
    blocks = extract_python_blocks(card.text)
    for block in blocks:
        assert f'hf_hub_download("{REPO_ID}", "example.png")' in block
        assert f'"{instruction}"' in block and "max_new_tokens=80" in block
    assert "chosen when this model was exported" in card.text and "is drawn" not in card.text
    app = (folder / "app.py").read_text()
    assert f"EXAMPLE_INSTRUCTION = {instruction!r}" in app
    assert "DEFAULT_MAX_NEW_TOKENS = 80" in app
    assert f"it serves `{REPO_ID}`" in card.text


def test_export_refuses_a_bad_example_before_writing(parts, tmp_path):
    picture = np.zeros((8, 8, 3), dtype=np.uint8)
    for example, match in (
        (picture, "pair"),
        ((picture, "x", "y"), "pair"),
        ((picture, "  "), "non-empty str"),
        ((picture.astype(float), "x"), "uint8"),
        ((b"bytes", "x"), "PIL image"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            export(*parts, tmp_path / "model", example=example)
        assert not (tmp_path / "model").exists()


def test_card_parses_and_holds_the_run_facts(exported):
    card = ModelCard.load(exported.folder / "README.md")
    data = card.data
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-image"
    assert "image-segmentation" in data.tags  # found by that task, not run as that pipeline
    assert {"custom_code", "reasoning-segmentation", "toy"} <= set(data.tags)
    assert "**Which call.**" in card.text and 'pipeline("reasoning-segmentation"' in card.text
    assert data.base_model == ["Qwen/Qwen2.5-VL-7B-Instruct"]
    assert data.datasets == ["synthetic-shapes"]
    url = f"https://huggingface.co/{REPO_ID}/resolve/main/example.png"
    assert data.widget == [{"text": "the red square", "src": url}]  # the drawn example
    # metrics: exactly the given floats (None and counts left out), with the dataset named
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"gIoU", "cIoU", "T-acc"}
    assert results["gIoU"].metric_value == pytest.approx(0.4123)
    assert results["gIoU"].dataset_name == "SegCompass synthetic world"
    assert results["gIoU"].dataset_split == "test"
    text = card.text
    assert (
        "| attribute | 60.00 | 55.00 | - |" in text
        and "| overall | 41.23 | 50.00 | 100.00 |" in text
    )
    for heading in ("## Usage", "## Training recipe", "## Limitations", "## Interpretability",
                    "## Citation", "## Serving"):  # fmt: skip
        assert heading in text
    assert "toy model" in text and "synthetic" in text
    assert "| steps | 300 |" in text and "2605.22658" in text


def test_card_without_evaluation_says_so_and_refuses_empty_metrics(parts):
    card = build_model_card(parts[0].config, repo_id=REPO_ID)
    assert card.data.eval_results is None
    assert "No evaluation numbers were given" in card.text
    assert "toy model" not in card.text  # only the toy export says it is one
    with pytest.raises(ValueError, match="no metric value"):
        EvaluationReport.from_any({"n": 3})
    with pytest.raises(TypeError, match="dict of metric values"):
        EvaluationReport.from_any([0.5])


def test_push_uploads_the_folder_to_the_repo(exported):
    with (
        mock.patch("modeling_segcompass.serving.hub.HfApi.create_repo") as create_repo,
        mock.patch("modeling_segcompass.serving.hub.HfApi.upload_folder") as upload_folder,
    ):
        upload_folder.return_value = "commit-info"
        out = push_to_hub(exported.folder, REPO_ID, private=True)
    assert out == "commit-info"
    create_repo.assert_called_once()
    assert create_repo.call_args.kwargs["repo_id"] == REPO_ID
    assert create_repo.call_args.kwargs["private"] is True
    assert create_repo.call_args.kwargs["exist_ok"] is True
    kwargs = upload_folder.call_args.kwargs
    assert kwargs["folder_path"] == str(exported.folder)
    assert kwargs["repo_id"] == REPO_ID and kwargs["repo_type"] == "model"


def test_push_refuses_a_folder_that_is_not_an_export(tmp_path):
    with mock.patch("modeling_segcompass.serving.hub.HfApi.upload_folder") as upload_folder:
        with pytest.raises(FileNotFoundError, match="not an export folder"):
            push_to_hub(tmp_path, REPO_ID)
    upload_folder.assert_not_called()


FRESH_PROCESS = (
    HIDE_PACKAGE
    + inspect.getsource(force_answer)
    + textwrap.dedent(
        """
    import io, json, sys, contextlib, traceback

    import numpy as np
    from transformers import AutoProcessor, pipeline

    folder, snippets = sys.argv[1], json.loads(sys.argv[2])
    report = {"snippets": [], "errors": []}
    for code in snippets:  # the usage, as a user would paste it
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                exec(compile(code, "card-snippet", "exec"), {"__name__": "__main__"})
        except Exception:
            report["errors"].append(code + "\\n" + traceback.format_exc()[-1500:])
        report["snippets"].append(buffer.getvalue())

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    report["processor"] = type(processor).__name__
    pipe = pipeline(model=folder, trust_remote_code=True)
    image = np.load(folder + "/probe_image.npy")
    out = pipe(image, "the red square", max_new_tokens=7, confidence_threshold=-1e9,
               generation_kwargs={"prefix_allowed_tokens_fn": force_answer(3)})
    report.update(
        pipeline=type(pipe).__name__,
        module=type(pipe.model).__module__,
        text=out["text"],
        scores=out["scores"],
        masks=[m.astype(int).tolist() for m in out["masks"]],
        trace_slots=[t["slot"] for t in out["concept_trace"]],
    )
    print(json.dumps(report))
    """
    )
)


@pytest.mark.slow
def test_export_works_in_a_fresh_process_without_the_package(exported_here, pipe):
    """Every code block of the card runs verbatim, and so does the code the Hub generates
    from the card's pipeline_tag."""
    folder = exported_here.folder
    probe = np.random.default_rng(3).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    np.save(folder / "probe_image.npy", probe)  # test-made array, not a pickle
    card = ModelCard.load(folder / "README.md")
    snippets = extract_python_blocks(card.text)  # as written, nothing replaced
    assert len(snippets) == 2 and all("trust_remote_code=True" in s for s in snippets)
    assert all(f"{folder.resolve()}/example.png" in s for s in snippets)
    # a card without an example draws its image in the snippets
    drawn = build_model_card(pipe.model.config, repo_id=str(folder))
    snippets += extract_python_blocks(drawn.text)
    snippets += hub_use_this_model_snippets(card.data.pipeline_tag, str(folder))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder), json.dumps(snippets)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (folder / "probe_image.npy").unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["errors"] == [], "\n\n".join(report["errors"])
    assert report["processor"] == "SegCompassProcessor"
    assert report["pipeline"] == "ReasoningSegmentationPipeline"
    assert report["module"].startswith("transformers_modules.")
    assert "(64, 64)" in report["snippets"][0] or "[]" in report["snippets"][0]
    assert "torch.Size" in report["snippets"][1]
    # the same answer as the pipeline built in this process from the in-memory model
    expected = pipe(probe, "the red square", max_new_tokens=7, confidence_threshold=-1e9,
                    generation_kwargs=FORCE_REFS)  # fmt: skip
    assert report["text"] == expected["text"] == "<think>+</think><REF_POS><REF_POS><REF_POS>"
    assert report["scores"] == pytest.approx(expected["scores"], rel=1e-5)
    assert report["trace_slots"] == [0, 1, 2]
    for got, want in zip(report["masks"], expected["masks"]):
        np.testing.assert_array_equal(np.array(got, dtype=bool), want)


# --------------------------------------------------------------------------- endpoint handler
def test_rle_round_trip_and_hand_computed_runs():
    mask = np.array([[0, 1, 1], [0, 1, 0]], dtype=bool)
    # column-major: col0 = 0 0, col1 = 1 1, col2 = 1 0 -> runs 2 zeros, 3 ones, 1 zero
    assert mask_to_rle(mask) == {"size": [2, 3], "counts": [2, 3, 1]}
    assert mask_to_rle(np.ones((2, 2), bool))["counts"] == [0, 4]  # starts with background
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (5, 7), (16, 9)):
        random = rng.random(shape) > 0.5
        np.testing.assert_array_equal(rle_to_mask(mask_to_rle(random)), random)
    with pytest.raises(ValueError, match="sum to"):
        rle_to_mask({"size": [2, 2], "counts": [1, 1]})


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_endpoint_handler_answers_base64_and_binary_requests(pipe):
    handler = EndpointHandler(pipe=pipe)
    picture = np.random.default_rng(5).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    parameters = {"max_new_tokens": 7, "confidence_threshold": -1e9}
    expected = pipe(picture, "the red square", generation_kwargs=FORCE_REFS, **parameters)
    with mock.patch.object(pipe, "_forward_params", {"generation_kwargs": FORCE_REFS}):
        as_json = handler(
            {
                "inputs": {"image": "data:image/png;base64," + png_base64(picture),
                           "instruction": "the red square"},
                "parameters": parameters,
            }
        )  # fmt: skip
        binary = handler(
            {
                "inputs": Image.fromarray(picture),
                "parameters": {**parameters, "instruction": "the red square"},
            }
        )
    json.dumps(as_json)  # the response is JSON-serialisable
    for response in (as_json, binary):
        assert response["text"] == expected["text"]
        assert response["scores"] == pytest.approx(expected["scores"])
        assert len(response["masks"]) == 3
        for rle, want in zip(response["masks"], expected["masks"]):
            np.testing.assert_array_equal(rle_to_mask(rle), want)
        assert len(response["concept_trace"]) == 3


def test_endpoint_handler_refuses_bad_requests(pipe):
    handler = EndpointHandler(pipe=pipe)
    picture = png_base64(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="instruction"):
        handler({"inputs": {"image": picture}})
    with pytest.raises(ValueError, match="Unknown parameters"):
        handler({"inputs": {"image": picture, "instruction": "x"}, "parameters": {"top_p": 1}})
    with pytest.raises(ValueError, match="base64"):
        handler({"inputs": {"image": "not base64 !", "instruction": "x"}})
    with pytest.raises(ValueError, match="decode the image"):
        handler({"inputs": {"image": base64.b64encode(b"abc").decode(), "instruction": "x"}})


# --------------------------------------------------------------------------- Gradio app
def test_overlay_blends_each_mask_in_its_colour():
    picture = np.full((2, 3, 3), 100, dtype=np.uint8)
    first = np.array([[1, 0, 0], [0, 0, 0]], dtype=bool)
    second = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)
    out = overlay_masks(picture, [first, second], alpha=0.5)
    once = 0.5 * 100 + 0.5 * np.array(PALETTE[0], dtype=float)
    np.testing.assert_array_equal(out[0, 0], np.rint(0.5 * once + 0.5 * np.array(PALETTE[1])))
    np.testing.assert_array_equal(out[0, 1], np.rint(0.5 * 100 + 0.5 * np.array(PALETTE[1])))
    np.testing.assert_array_equal(out[1], picture[1])  # outside every mask: unchanged
    with pytest.raises(ValueError, match="shape"):
        overlay_masks(picture, [np.zeros((3, 3), bool)])


def test_demo_function_shows_masks_text_and_trace():
    picture = np.zeros((4, 5, 3), dtype=np.uint8)
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 2:4] = True
    calls = []

    def fake_pipe(image, instruction, **kwargs):
        calls.append((image.shape, instruction, kwargs))
        return {
            "masks": [mask],
            "scores": [0.8],
            "slot_indices": [1],
            "text": "<think> red square </think> <REF_POS>",
            "reason": None,
            "concept_trace": [{"slot": 1, "kept": True, "concepts": []}],
        }

    result = segment_for_demo(fake_pipe, Image.fromarray(picture), "  the red square ",
                              max_new_tokens=8)  # fmt: skip
    assert calls == [((4, 5, 3), "the red square", {"max_new_tokens": 8})]
    np.testing.assert_array_equal(result.overlay[mask], np.rint(0.5 * np.array([PALETTE[0]] * 4)))
    assert (result.overlay[~mask] == 0).all()
    assert "red square" in result.text and "slot 1" in result.text and "0.80" in result.text
    assert json.loads(result.trace_json)[0]["slot"] == 1
    with pytest.raises(ValueError, match="instruction"):
        segment_for_demo(fake_pipe, picture, " ")


def test_demo_function_with_the_real_pipeline_explains_a_missing_mask(pipe):
    picture = np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    result = segment_for_demo(pipe, picture, "the red square", max_new_tokens=7,
                              confidence_threshold=1e9, generation_kwargs=FORCE_REFS)  # fmt: skip
    np.testing.assert_array_equal(result.overlay, picture)  # no mask, nothing drawn
    assert "No mask:" in result.text and "confidence threshold" in result.text
    assert len(json.loads(result.trace_json)) == 3


def test_gradio_blocks_build(pipe):
    gr = pytest.importorskip("gradio", reason="gradio is not installed (the `serve` extra)")
    demo = build_demo(pipe)
    assert isinstance(demo, gr.Blocks)


# --------------------------------------------------------------------------- what the Space shows
def test_space_names_image_patches_and_labels_concepts(pipe, parts):
    """The trace names image tokens patch(row,col) as the CLI does (`interpret.labels`), and
    gives each concept its label."""
    from modeling_segcompass.interpret.labels import describe_tokens

    model, processor = parts
    picture = np.random.default_rng(2).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    kwargs = dict(max_new_tokens=7, confidence_threshold=-1e9, generation_kwargs=FORCE_REFS,
                  top_concepts=50, top_tokens=50)  # fmt: skip
    raw = pipe(picture, "the red square", **kwargs)["concept_trace"]
    first = raw[0]["concepts"][0]["id"]
    result = segment_for_demo(pipe, picture, "the red square", concept_labels={first: "red"},
                              **kwargs)  # fmt: skip
    trace = json.loads(result.trace_json)
    encoded = processor(images=[picture], instructions=["the red square"], return_tensors="pt")
    (infos,) = describe_tokens(encoded["input_ids"], model.config,
                               image_grid_thw=encoded["image_grid_thw"],
                               tokenizer=processor.tokenizer)  # fmt: skip
    cli_names = {info.position: info.token for info in infos if info.kind == "visual"}
    tokens = [t for slot in trace for c in slot["concepts"] for t in c["tokens"]]
    visual = [t for t in tokens if t["position"] in cli_names]
    assert visual and all(t["token"] == cli_names[t["position"]] for t in visual)
    assert all(t["token"].startswith("patch(") for t in visual)
    assert not any(t["token"] == "<|image_pad|>" for t in tokens)
    labels = {c["id"]: c["label"] for slot in trace for c in slot["concepts"]}
    assert labels[first] == "red" and set(labels.values()) == {"red", None}


def _concept_labels_file(folder):
    from modeling_segcompass.interpret.labels import ConceptLabels, save_concept_labels

    latent = {"num_fired": 1, "frequency": 0.1, "mean_activation": 1.0, "max_activation": 1.0,
              "visual_share": 0.0, "top_tokens": [], "top_patches": []}  # fmt: skip
    labels = ConceptLabels.from_dict({
        "format": "segcompass-concept-labels", "version": 1, "d_sae": 64, "sae_layer": 1,
        "num_samples": 1, "num_tokens": 1, "top_k": 1,
        "latents": {"3": {"latent_id": 3, "label": "red", **latent},
                    "4": {"latent_id": 4, "label": None, **latent}},
    })  # fmt: skip
    return save_concept_labels(labels, folder)


def _load_app(folder, monkeypatch):
    """The exported app.py as a module (as `python app.py` would run it, without main)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("exported_app", folder / "app.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def test_exported_app_offers_the_example_and_reads_the_concept_labels(
    parts, pipe, tmp_path, monkeypatch
):
    monkeypatch.delenv("SEGCOMPASS_MODEL", raising=False)
    (tmp_path / "labels").mkdir()
    labels_path = _concept_labels_file(tmp_path / "labels")
    picture = np.random.default_rng(4).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    folder = export(*parts, tmp_path / "model", example=(picture, "the red square"),
                    extra_files=[labels_path]).folder  # fmt: skip
    app = _load_app(folder, monkeypatch)
    model_id = app.resolve_model_id()
    assert model_id == str(folder.resolve())
    examples = app.example_inputs(model_id)
    assert examples == [[str(folder.resolve() / "example.png"), "the red square"]]
    labels = app.load_concept_labels(app.model_file(model_id, "concept_labels.json"))
    assert labels == {3: "red"}
    assert app.model_file(model_id, "no_such_file.json") is None
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a SegCompass concept-label file"):
        app.load_concept_labels(str(tmp_path / "bad.json"))
    gr = pytest.importorskip("gradio", reason="gradio is not installed (the `serve` extra)")
    demo = app.build_demo(pipe, examples=examples, concept_labels=labels)
    assert isinstance(demo, gr.Blocks)
    types = [component.get("type") for component in demo.config["components"]]
    assert "dataset" in types  # gr.Examples: the example is offered as an input


def test_requirements_take_the_package_ranges(exported, request):
    """requirements.txt asks for what setup.py asks for (transformers>=5.23, not >=5.0)."""
    import ast

    setup = (request.config.rootpath / "setup.py").read_text()
    tree = ast.parse(setup)
    (core,) = [
        ast.literal_eval(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CORE"
    ]  # fmt: skip
    lines = (exported.folder / "requirements.txt").read_text().split()
    assert {"torch", "transformers", "numpy", "pillow"} <= {
        re.split(r"[<>=!~]", line)[0] for line in lines
    }
    for line in lines:
        assert line in core, f"{line} is not setup.py's range ({core})"


def test_card_keeps_every_metric_and_names_its_sources(parts):
    evaluation = {"gIoU": np.float32(0.25), "cIoU": 0.5, "T-acc": 1, "N-acc": None, "n": 4}
    card = build_model_card(
        parts[0].config, repo_id=REPO_ID, evaluation=evaluation,
        base_models=["Qwen/Qwen2.5-VL-7B-Instruct", "/data/runs/sae-7"],
        datasets=["me/reasonseg-train", "a synthetic world"],
    )  # fmt: skip
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"gIoU": 0.25, "cIoU": 0.5, "T-acc": 1.0}  # counts and None left out
    assert "| overall | 25.00 | 50.00 | 100.00 |" in card.text
    # metadata: Hub ids only (the Hub refuses a card whose base_model is a local path)
    assert card.data.base_model == ["Qwen/Qwen2.5-VL-7B-Instruct"]
    assert card.data.datasets == ["me/reasonseg-train"]
    text = card.text
    assert (
        "[`Qwen/Qwen2.5-VL-7B-Instruct`](https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct)"
        in text
    )
    assert "- `/data/runs/sae-7`" in text
    assert "Training data:" in text and "https://huggingface.co/datasets/me/reasonseg-train" in text
    assert "- `a synthetic world`" in text
