"""The `segcompass` command line: help, data specs, predict / eval / export / train-sae / sft
on a tiny saved model, and the user-error path (exit 2, one line, no traceback)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.cli import build_parser, main
from modeling_segcompass.cli.data import load_rows, parse_data_spec
from modeling_segcompass.cli.predict import SLOT_COLOURS, overlay_masks
from modeling_segcompass.data.formats import decode_rle
from tests.helpers import build_tiny_tokenizer_and_processor

COMMANDS = ("demo", "train-sae", "sft", "grpo", "eval", "predict", "export")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model and its processor saved into one folder, as `save_pretrained` writes."""
    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- help
def _options_of(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return [o for a in sub._actions for o in a.option_strings if o.startswith("--")]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_option_with_its_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    options = _options_of(command)
    assert len(options) >= 4
    for option in options:
        assert option in out, f"{command} --help does not mention {option}"
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    undocumented = [a.dest for a in sub._actions if a.option_strings and not a.help]
    assert undocumented == []


def test_help_shows_defaults_and_the_demo_options(capsys):
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0
    for option in ("--output-dir", "--minutes", "--seed", "--quick", "--threads"):
        assert option in out
    assert "(default: 14.0)" in out and "(default: demo_output)" in out
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(c in out for c in COMMANDS)


def test_demo_passes_its_options_to_run_demo(capsys, monkeypatch, tmp_path):
    import modeling_segcompass.demo.run as demo

    seen = {}

    class Summary:
        def to_text(self):
            return "demo summary text"

    def fake(output_dir, **kwargs):
        seen.update(output_dir=output_dir, **kwargs)
        return Summary()

    monkeypatch.setattr(demo, "run_demo", fake)
    code, out, _ = run(
        capsys, "demo", "--output-dir", tmp_path, "--minutes", "3.5", "--seed", "7", "--quick",
        "--threads", "1", "--cot-style", "focused", "--config", "codebook_dim=64",
    )  # fmt: skip
    assert code == 0 and "demo summary text" in out
    assert seen == {"output_dir": str(tmp_path), "minutes": 3.5, "seed": 7, "quick": True,
                    "threads": 1, "cot_style": "focused",
                    "config_overrides": {"codebook_dim": 64}, "processes": None}  # fmt: skip
    code, _, err = run(capsys, "demo", "--cot-style", "scene")
    assert code != 0 and "invalid choice: 'scene'" in err and "scene_first" in err


# --------------------------------------------------------------------------- data specs
def test_data_specs_parse_and_bad_ones_are_user_errors(tmp_path):
    assert parse_data_spec("synthetic[:6]").count == 6
    assert parse_data_spec("synthetic:12").count == 12
    assert parse_data_spec("synthetic").count is None
    spec = parse_data_spec("refcoco:C:/data/refer:refcoco+:testA")  # a root with a colon
    assert (spec.kind, spec.root, spec.dataset, spec.split) == (
        "refcoco", "C:/data/refer", "refcoco+", "testA",
    )  # fmt: skip
    spec = parse_data_spec("reasonseg:/x/y:val")
    assert (spec.kind, spec.root, spec.split) == ("reasonseg", "/x/y", "val")
    assert parse_data_spec(str(tmp_path)).kind == "disk"
    for bad in ("synthetic[:0]", "synthetic[:x]", "refcoco:/r:refclef:val", "grefcoco:/r",
                str(tmp_path / "missing")):  # fmt: skip
        with pytest.raises(ValueError):
            parse_data_spec(bad)


def test_synthetic_rows_follow_the_model_slots_and_the_limit():
    rows = load_rows(parse_data_spec("synthetic[:5]"), num_slots=2, limit=3)
    assert len(rows) == 3
    for row in rows:
        assert row["response"].count("<REF_POS>") == 2
        assert row["masks"].shape[0] == row["num_objects"]


def test_saved_dataset_rows_are_normalised(tmp_path):
    from modeling_segcompass.data.synthetic import SyntheticWorldConfig, build_dataset

    build_dataset(SyntheticWorldConfig(num_slots=3), 4).save_to_disk(tmp_path / "ds")
    rows = load_rows(parse_data_spec(str(tmp_path / "ds")), num_slots=3)
    direct = load_rows(parse_data_spec("synthetic[:4]"), num_slots=3)
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in direct]
    for a, b in zip(rows, direct):
        assert a["masks"].dtype == np.uint8 and np.array_equal(a["masks"], b["masks"])
        assert a["num_objects"] == b["num_objects"]


# --------------------------------------------------------------------------- overlay
def test_overlay_tints_only_mask_pixels_with_the_slot_colour():
    image = Image.fromarray(np.full((4, 5, 3), 100, np.uint8))
    masks = np.zeros((2, 4, 5), bool)
    masks[0, 0, 0] = True
    masks[1, 3, 4] = True
    out = np.asarray(overlay_masks(image, masks, [0, 2], alpha=0.5))
    red, blue = SLOT_COLOURS[0], SLOT_COLOURS[2]
    assert out[0, 0].tolist() == [round(50 + c / 2) for c in red]
    assert out[3, 4].tolist() == [round(50 + c / 2) for c in blue]
    untouched = np.ones((4, 5), bool)
    untouched[0, 0] = untouched[3, 4] = False
    assert (out[untouched] == 100).all()


# --------------------------------------------------------------------------- predict
def _force_completion(monkeypatch, words):
    """Make `segment` generate exactly `words` (an untrained model rarely writes <REF_POS>)."""
    original = SegCompassForReasoningSegmentation.segment

    def segment(self, images, instructions, processor=None, **kwargs):
        ids = processor.tokenizer.convert_tokens_to_ids(words)
        start = {}

        def allowed(batch_id, input_ids):
            start.setdefault("n", input_ids.shape[-1])
            return [ids[min(input_ids.shape[-1] - start["n"], len(ids) - 1)]]

        kwargs["generation_kwargs"] = {"prefix_allowed_tokens_fn": allowed}
        return original(self, images, instructions, processor, **kwargs)

    monkeypatch.setattr(SegCompassForReasoningSegmentation, "segment", segment)


@pytest.mark.parametrize("forced", [False, True])
def test_predict_writes_overlay_result_and_report(
    capsys, monkeypatch, model_dir, image_path, tmp_path, forced
):
    if forced:
        words = ["<think>", "Ġred", "</think>", "<REF_POS>", "<REF_POS>", "<|im_end|>"]
        _force_completion(monkeypatch, words)
    out_dir = tmp_path / "pred"
    code, out, err = run(
        capsys, "predict", "--model", model_dir, "--image", image_path, "--instruction",
        "the red circle", "--output", out_dir, "--max-new-tokens", "6",
        "--confidence-threshold=-1e9",
    )  # fmt: skip
    assert code == 0, err
    assert {"mask.png", "result.json", "report.html", "image_0.png"} <= {
        p.name for p in out_dir.iterdir()
    }
    result = json.loads((out_dir / "result.json").read_text())
    expected = {"image", "instruction", "text", "cot", "reason", "image_size", "scores",
                "slot_indices", "conf_logits", "masks", "concept_trace", "files"}  # fmt: skip
    assert expected <= set(result)
    assert result["instruction"] == "the red circle" and result["image_size"] == [40, 56]
    assert result["text"] in out  # the completion is printed
    assert len(result["conf_logits"]) == 3
    assert len(result["masks"]) == len(result["scores"]) == len(result["slot_indices"])
    assert (result["reason"] is None) == (len(result["masks"]) > 0)
    if forced:  # two <REF_POS> tokens ground slots 0 and 1; the threshold keeps both
        assert result["slot_indices"] == [0, 1] and result["reason"] is None
        assert result["cot"] == "red" and "chain of thought: red" in out
    # scores are the sigmoid of the kept slots' confidence logits
    logits = torch.tensor(result["conf_logits"])[result["slot_indices"]]
    assert np.allclose(result["scores"], torch.sigmoid(logits).tolist(), atol=1e-6)
    trace = result["concept_trace"]
    assert [s["slot"] for s in trace["slots"]] == [0, 1, 2]
    assert [s["slot"] for s in trace["slots"] if s["kept"]] == result["slot_indices"]
    # mask.png is exactly the overlay of the masks result.json records
    image = Image.open(image_path).convert("RGB")
    masks = (
        np.stack([decode_rle(m["rle"]).astype(bool) for m in result["masks"]])
        if result["masks"]
        else np.zeros((0, 40, 56), bool)
    )
    assert [int(m.sum()) for m in masks] == [m["area"] for m in result["masks"]]
    expected_png = np.asarray(overlay_masks(image, masks, result["slot_indices"]))
    assert np.array_equal(np.asarray(Image.open(out_dir / "mask.png")), expected_png)
    assert "image_0.png" in (out_dir / "report.html").read_text()


@pytest.mark.parametrize("strict", [True, False])
def test_predict_broken_format_gives_no_mask_unless_not_strict(
    capsys, monkeypatch, model_dir, image_path, tmp_path, strict
):
    _force_completion(monkeypatch, ["<think>", "Ġred", "<REF_POS>", "<|im_end|>"])  # no </think>
    out_dir = tmp_path / "pred"
    flags = [] if strict else ["--no-strict-format"]
    code, out, err = run(
        capsys, "predict", "--model", model_dir, "--image", image_path, "--instruction",
        "the red circle", "--output", out_dir, "--max-new-tokens", "4",
        "--confidence-threshold=-1e9", *flags,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((out_dir / "result.json").read_text())
    if strict:
        assert result["masks"] == [] and "breaks the format" in result["reason"]
    else:
        assert result["slot_indices"] == [0] and result["reason"] is None


def test_predict_missing_image_is_a_one_line_user_error(capsys, model_dir, tmp_path):
    missing = tmp_path / "nope.png"
    code, out, err = run(
        capsys, "predict", "--model", model_dir, "--image", missing, "--instruction", "x",
        "--output", tmp_path / "o",
    )  # fmt: skip
    assert code == 2
    assert str(missing) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_model_folder_without_config_or_processor_is_a_user_error(
    capsys, model_dir, image_path, tmp_path
):
    args = ["--image", image_path, "--instruction", "x", "--output", tmp_path / "o"]
    code, _, err = run(capsys, "predict", "--model", tmp_path, *args)
    assert code == 2 and "config.json" in err and "Traceback" not in err
    no_processor = tmp_path / "bare"
    no_processor.mkdir()
    (no_processor / "config.json").write_text((model_dir / "config.json").read_text())
    code, _, err = run(capsys, "predict", "--model", no_processor, *args)
    assert code == 2 and "processor" in err


# --------------------------------------------------------------------------- eval / export
@pytest.fixture(scope="module")
def eval_json(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.json"
    code = main(
        ["eval", "--model", str(model_dir), "--data", "synthetic[:6]", "--teacher-forced",
         "--output", str(path), "--no-progress", "--batch-size", "4"]
    )  # fmt: skip
    assert code == 0
    return path


def test_eval_writes_metrics_consistent_with_the_samples(eval_json):
    report = json.loads(eval_json.read_text())
    overall = report["overall"]
    assert {"gIoU", "cIoU", "N-acc", "T-acc", "n"} <= set(overall)
    assert overall["n"] == report["num_samples"] == len(report["samples"]) == 6
    assert report["mode"] == "teacher_forced" and report["empty_iou"] == 1.0
    ious = [s["iou"] for s in report["samples"]]
    assert overall["gIoU"] == pytest.approx(np.mean(ious))
    families = {s["family"] for s in report["samples"]}
    assert set(report["per_family"]) == families
    assert sum(g["n"] for g in report["per_family"].values()) == 6
    assert report["table"].startswith("| group | gIoU")


def test_eval_end_to_end_prints_the_table(capsys, model_dir, tmp_path):
    path = tmp_path / "e2e.json"
    code, out, err = run(
        capsys, "eval", "--model", model_dir, "--data", "synthetic[:2]", "--output", path,
        "--max-new-tokens", "4", "--no-progress", "--empty-iou", "0",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(path.read_text())
    assert report["mode"] == "end_to_end" and report["empty_iou"] == 0.0
    assert all("text" in s for s in report["samples"])
    assert report["table"] in out


def test_export_writes_a_hub_folder_with_the_eval_numbers(capsys, model_dir, eval_json, tmp_path):
    out_dir = tmp_path / "hub"
    code, out, err = run(
        capsys, "export", "--model", model_dir, "--output", out_dir, "--repo-id", "me/tiny",
        "--eval-json", eval_json, "--toy",
    )  # fmt: skip
    assert code == 0, err
    files = {p.name for p in out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_segcompass.py",
            "configuration_segcompass.py", "processing_segcompass.py", "README.md",
            "handler.py", "app.py"} <= files  # fmt: skip
    card = (out_dir / "README.md").read_text()
    giou = json.loads(eval_json.read_text())["overall"]["gIoU"]
    assert "me/tiny" in card and f"{100 * giou:.1f}" in card
    # the exported weights are the model's
    from safetensors.torch import load_file

    assert (
        load_file(out_dir / "model.safetensors").keys()
        == load_file(model_dir / "model.safetensors").keys()
    )
    # a second export into the same non-empty folder is refused without --overwrite
    code, _, err = run(capsys, "export", "--model", model_dir, "--output", out_dir)
    assert code == 2 and "--overwrite" in err


# --------------------------------------------------------------------------- training
def test_train_sae_saves_a_model_whose_sae_is_the_trained_one(capsys, model_dir, tmp_path):
    from modeling_segcompass.sparse_autoencoder import SparseAutoencoder

    out_dir = tmp_path / "sae-model"
    code, out, err = run(
        capsys, "train-sae", "--model", model_dir, "--data", "synthetic[:4]", "--output", out_dir,
        "--steps", "5", "--batch-size", "64", "--no-progress", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out_dir / "sae_report.json").read_text())
    assert report["steps"] == 5 and 0 <= report["dead_fraction"] <= 1
    saved = SegCompassForReasoningSegmentation.from_pretrained(out_dir)
    before = SegCompassForReasoningSegmentation.from_pretrained(model_dir)
    sae = SparseAutoencoder.load(out_dir / "sae")
    assert torch.equal(saved.sae.W_enc, sae.W_enc)
    assert not torch.equal(saved.sae.W_enc, before.sae.W_enc)
    assert (out_dir / "processor_config.json").is_file()


def test_sft_trains_saves_and_refuses_a_resume_without_checkpoint(capsys, model_dir, tmp_path):
    out_dir = tmp_path / "sft"
    code, _, err = run(
        capsys, "sft", "--model", model_dir, "--data", "synthetic[:4]", "--output", out_dir,
        "--resume",
    )  # fmt: skip
    assert code == 2 and "checkpoint" in err
    code, out, err = run(
        capsys, "sft", "--model", model_dir, "--data", "synthetic[:4]", "--output", out_dir,
        "--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--lr-multipliers", "uniform",
        "--no-progress", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    log = json.loads((out_dir / "training_log.json").read_text())
    assert log[-1]["step"] == 2
    trained = SegCompassForReasoningSegmentation.from_pretrained(out_dir).state_dict()
    start = SegCompassForReasoningSegmentation.from_pretrained(model_dir).state_dict()
    assert not torch.equal(trained["codebook.slot_queries"], start["codebook.slot_queries"])


def test_sft_resume_by_path_continues_the_stopped_run(capsys, model_dir, tmp_path):
    """A 3-step run vs the same run stopped after checkpoint-2 and resumed by path."""
    options = [
        "--model", model_dir, "--data", "synthetic[:8]", "--steps", "3", "--batch-size", "2",
        "--lr", "1e-2", "--lr-multipliers", "uniform", "--save-steps", "2", "--no-progress",
        "--device", "cpu",
    ]  # fmt: skip
    full = tmp_path / "full"
    code, _, err = run(capsys, "sft", *options, "--output", full)
    assert code == 0, err
    final = SegCompassForReasoningSegmentation.from_pretrained(full).state_dict()
    out = tmp_path / "stopped"
    out.mkdir()  # only checkpoint-2 survived
    shutil.copytree(full / "checkpoint-2", out / "checkpoint-2")
    # start the resumed run from other weights: only a real resume can reach `final`
    other = tmp_path / "other_model"
    shutil.copytree(model_dir, other)
    model = SegCompassForReasoningSegmentation.from_pretrained(other)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1)
    model.save_pretrained(other)
    options[options.index("--model") + 1] = other
    code, _, err = run(capsys, "sft", *options, "--output", out, "--resume", out / "checkpoint-2")
    assert code == 0, err
    resumed = SegCompassForReasoningSegmentation.from_pretrained(out).state_dict()
    for name, value in final.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=1e-5, msg=name)
    code, _, err = run(capsys, "sft", *options, "--output", out, "--resume", full / "nope")
    assert code == 2 and "no such checkpoint" in err


def test_grpo_runs_a_step_and_saves_the_updated_model(capsys, model_dir, tmp_path):
    out_dir = tmp_path / "grpo"
    code, out, err = run(
        capsys, "grpo", "--model", model_dir, "--data", "synthetic[:4]", "--output", out_dir,
        "--steps", "1", "--batch-size", "4", "--num-generations", "2",
        "--max-completion-length", "6", "--lr", "1e-2", "--no-progress", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    log = json.loads((out_dir / "training_log.json").read_text())
    assert any("seg_loss" in entry for entry in log)
    trained = SegCompassForReasoningSegmentation.from_pretrained(out_dir).state_dict()
    start = SegCompassForReasoningSegmentation.from_pretrained(model_dir).state_dict()
    changed = [k for k in start if not torch.equal(start[k], trained[k])]
    assert any(k.startswith("mask_decoder.") for k in changed)
    assert any(k.startswith("codebook.") for k in changed)


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.glob("runs/*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_sft_and_grpo_report_to_tensorboard_while_training(capsys, model_dir, tmp_path):
    code, out, err = run(
        capsys, "sft", "--model", model_dir, "--data", "synthetic[:4]", "--output",
        tmp_path / "sft", "--steps", "2", "--batch-size", "2", "--logging-steps", "1",
        "--no-progress", "--device", "cpu", "--report-to", "tensorboard",
    )  # fmt: skip
    assert code == 0, err
    assert "tensorboard --logdir" in out
    assert {"train/loss", "train/seg_loss", "train/learning_rate"} <= _tensorboard_scalars(
        tmp_path / "sft"
    )
    code, out, err = run(
        capsys, "grpo", "--model", model_dir, "--data", "synthetic[:4]", "--output",
        tmp_path / "grpo", "--steps", "1", "--batch-size", "4", "--num-generations", "2",
        "--max-completion-length", "6", "--logging-steps", "1", "--no-progress", "--device",
        "cpu", "--report-to", "tensorboard",
    )  # fmt: skip
    assert code == 0, err
    assert "train/reward" in _tensorboard_scalars(tmp_path / "grpo")


def test_grpo_mask_loss_completions_reaches_the_trainer(capsys, model_dir, tmp_path):
    out_dir = tmp_path / "grpo"
    code, out, err = run(
        capsys, "grpo", "--model", model_dir, "--data", "synthetic[:4]", "--output", out_dir,
        "--steps", "1", "--batch-size", "4", "--num-generations", "2",
        "--max-completion-length", "6", "--no-progress", "--device", "cpu",
        "--mask-loss-completions", "above_group_mean",
        "--conf-loss-completions", "not_below_group_mean",
    )  # fmt: skip
    assert code == 0, err
    log = json.loads((out_dir / "training_log.json").read_text())
    for name in ("mask_loss_fraction", "conf_loss_fraction"):
        fractions = [entry[name] for entry in log if name in entry]
        assert fractions and all(0.0 <= f <= 1.0 for f in fractions), name


def test_grpo_resume_continues_the_stopped_run(capsys, model_dir, tmp_path):
    """A 2-step run vs the same run stopped after checkpoint-1 and resumed (auto and by path)."""
    options = [
        "--model", model_dir, "--data", "synthetic[:4]", "--steps", "2", "--batch-size", "4",
        "--num-generations", "2", "--max-completion-length", "6", "--lr", "1e-2",
        "--beta", "0.05", "--save-steps", "1", "--logging-steps", "1", "--no-progress",
        "--device", "cpu",
    ]  # fmt: skip
    full = tmp_path / "full"
    code, _, err = run(capsys, "grpo", *options, "--output", full)
    assert code == 0, err
    reference = json.loads((full / "training_log.json").read_text())
    final = SegCompassForReasoningSegmentation.from_pretrained(full).state_dict()

    def steps_of(log):
        return {
            e["step"]: {k: v for k, v in e.items() if "time" not in k} for e in log if "loss" in e
        }

    for how in ("auto", "path"):
        out = tmp_path / how
        code, _, err = run(capsys, "grpo", *options, "--output", out, "--resume")
        assert code == 2 and "no complete checkpoint" in err
        code, _, err = run(capsys, "grpo", *options, "--output", out, "--resume", full / "nope")
        assert code == 2 and "no such checkpoint" in err
        out.mkdir()  # the stopped run: only checkpoint-1 survived
        shutil.copytree(full / "checkpoint-1", out / "checkpoint-1")
        resume = ["--resume"] if how == "auto" else ["--resume", out / "checkpoint-1"]
        code, printed, err = run(capsys, "grpo", *options, "--output", out, *resume)
        assert code == 0, err
        assert "GRPO: 2 steps" in printed
        log = json.loads((out / "training_log.json").read_text())
        got, expected = steps_of(log), steps_of(reference)
        assert sorted(got) == sorted(expected) == [1, 2]
        for step, entry in got.items():
            assert entry == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step
        resumed = SegCompassForReasoningSegmentation.from_pretrained(out).state_dict()
        for name, value in final.items():
            torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=1e-5, msg=name)
    (tmp_path / "half" / "checkpoint-3").mkdir(parents=True)  # killed while writing
    code, _, err = run(
        capsys, "grpo", *options, "--output", tmp_path / "o", "--resume",
        tmp_path / "half" / "checkpoint-3",
    )  # fmt: skip
    assert code == 2 and "incomplete checkpoint" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["grpo", "--batch-size", "6", "--num-generations", "4"], "multiple of"),
        (["grpo", "--lr-multipliers", "{bad"], "JSON"),
        (["sft", "--steps", "0"], "--steps must be >= 1"),
        (["sft", "--data", "nowhere:/x"], "neither a known form"),
        (["sft", "--report-to", "tensorbored"], "unknown integration(s) ['tensorbored']"),
        (["grpo", "--report-to", "wandb"], "not installed here"),
    ],
)
def test_bad_options_exit_2_before_any_work(capsys, model_dir, tmp_path, argv, message):
    base = ["--model", model_dir, "--data", "synthetic[:4]", "--output", tmp_path / "o"]
    code, _, err = run(capsys, *argv[:1], *base, *argv[1:])
    assert code == 2 and message in err and "Traceback" not in err


def test_unreadable_data_is_a_one_line_user_error(capsys, monkeypatch, model_dir, tmp_path):
    import modeling_segcompass.cli.data as data

    def unreadable(spec, **kwargs):
        raise OSError("image file is truncated")

    monkeypatch.setattr(data, "load_rows", unreadable)
    code, _, err = run(
        capsys, "eval", "--model", model_dir, "--data", "synthetic[:2]", "--output",
        tmp_path / "e.json", "--no-progress",
    )  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert "--data 'synthetic[:2]': could not read the data (image file is truncated)" in err


def test_unexpected_errors_exit_1_and_debug_shows_the_traceback(capsys, monkeypatch, tmp_path):
    import modeling_segcompass.demo.run as demo

    def boom(output_dir, **kwargs):
        raise RuntimeError("kaput")

    monkeypatch.setattr(demo, "run_demo", boom)
    code, _, err = run(capsys, "demo", "--output-dir", tmp_path)
    assert code == 1 and "kaput" in err and "--debug" in err and "Traceback" not in err
    code, _, err = run(capsys, "demo", "--output-dir", tmp_path, "--debug")
    assert code == 1 and "Traceback" in err


def test_usage_errors_of_argparse_return_2(capsys):
    code, _, err = run(capsys, "predict", "--image", "x.png")
    assert code == 2 and "required" in err


def test_command_names_stay_importable_from_the_commands_module():
    from modeling_segcompass.cli import commands

    assert commands.main is main and commands.load_rows is load_rows
    for name in ("load_model", "evaluate_rows", "overlay_masks", "cmd_demo", "CLIError"):
        assert hasattr(commands, name), name
