"""examples/check_setup.py: the "does my setup work" dry run, at its tiny preset.

The script's main() runs in-process on toy widths (same checkpoint formats, same image
processor, same steps as the real widths); the assertions read the printed table and the
JSON report: every step ran, the loss is finite, the reloaded model equals the in-process one
bit for bit in bfloat16, and a reload that differs is reported as a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "check_setup.py"


def load_script():
    spec = importlib.util.spec_from_file_location("check_setup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def run_main(script, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = script.main(argv)
    return code, out.getvalue(), err.getvalue()


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed table as {step: [cells after the name]}."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| step |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def tiny_run(script, tmp_path_factory):
    root = tmp_path_factory.mktemp("check-setup")
    report_path = root / "report.json"
    code, stdout, stderr = run_main(
        script,
        ["--preset", "tiny", "--workdir", str(root / "work"), "--json", str(report_path)],
    )
    return {
        "code": code,
        "stdout": stdout,
        "stderr": stderr,
        "report": json.loads(report_path.read_text()),
        "workdir": root / "work",
    }


@pytest.mark.slow
def test_every_step_is_run_timed_and_tabulated(script, tiny_run):
    assert tiny_run["code"] == 0, tiny_run["stderr"] + tiny_run["stdout"][-3000:]
    report = tiny_run["report"]
    assert report["ok"] and report["error"] is None
    expected = [n if n != "optimizer step" else "optimizer step (sgd)" for n in script.STEP_NAMES]
    assert [s["name"] for s in report["steps"]] == expected
    for step in report["steps"]:
        assert step["status"] == "ok", step
        assert step["seconds"] > 0, step
        assert step["peak_bytes"] >= step["rss_after_bytes"] > 0, step
    rows = table_rows(tiny_run["stdout"])
    assert list(rows) == expected
    for cells in rows.values():
        seconds, peak = float(cells[0]), cells[1]
        assert seconds >= 0 and peak.endswith("GiB")  # printed to 0.01 s: a fast step shows 0.00
    assert "| step | seconds | peak RSS | RSS after | RSS change |" in tiny_run["stdout"]
    assert "result: OK" in tiny_run["stdout"]


def test_training_step_and_losses(tiny_run):
    report = tiny_run["report"]
    losses = report["losses"]
    assert set(losses) == {"loss", "lm_loss", "seg_loss", "conf_loss"}
    assert all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    # the total is the configured weighted sum (lm 1, seg 1, conf 0.2)
    total = losses["lm_loss"] + losses["seg_loss"] + 0.2 * losses["conf_loss"]
    assert losses["loss"] == pytest.approx(total, rel=1e-4)
    assert report["grad_parameters"] > 0.9 * report["parameters"]["trainable"]


def test_reloaded_model_is_bit_for_bit_equal_in_bfloat16(tiny_run):
    report = tiny_run["report"]
    assert report["dtype"] == "bfloat16"
    diffs = report["reload_max_abs_diff"]
    assert {"logits", "mask_logits", "conf_logits", "heatmap_logits", "loss"} <= set(diffs)
    assert all(v == 0.0 for v in diffs.values()), diffs
    assert "reload: max |in-process - reloaded| = 0" in tiny_run["stdout"]


def test_processor_and_segment_outputs(tiny_run):
    report = tiny_run["report"]
    # Qwen2VLImageProcessor's defaults: 640x480 -> 644x476 -> 46x34 patches -> 391 tokens
    assert report["image_grid_thw"] == [1, 34, 46]
    assert report["image_tokens"] == 391
    segment = report["segment"]
    assert segment["reason"] is None
    assert segment["masks"] == [4, 480, 640]
    assert segment["text"].startswith("<think>") and segment["text"].count("<REF_POS>") == 4
    assert report["config"]["num_slots"] == 4 and report["config"]["d_sae"] == 256


def test_checkpoints_use_the_real_formats(tiny_run):
    vlm = tiny_run["workdir"] / "backbones" / "qwen2.5-vl-shaped"
    config = json.loads((vlm / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
    tokenizer = AutoTokenizer.from_pretrained(vlm)
    base = 300  # the tiny preset's base vocabulary: <|endoftext|> comes right after it
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"] == base + 12
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == config["vision_start_token_id"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    processor = AutoImageProcessor.from_pretrained(vlm)
    assert (processor.patch_size, processor.merge_size) == (14, 2)
    sam = json.loads(
        (tiny_run["workdir"] / "backbones" / "sam-vit-h-shaped" / "config.json").read_text()
    )
    assert sam["architectures"] == ["SamModel"]
    assert sam["vision_config"]["global_attn_indexes"] == [1]


def test_real_preset_matches_qwen25_vl_7b_and_sam_vit_h(script):
    """Configs only (no weights): the real widths and the real token ids."""
    config = script.vlm_config(script.PRESETS["real"], text_layers=28, vision_blocks=32)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.vocab_size) == (3584, 18944, 152064)
    assert (text.num_attention_heads, text.num_key_value_heads) == (28, 4)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert text.rope_parameters["rope_theta"] == 1e6
    assert (vision.hidden_size, vision.out_hidden_size, vision.intermediate_size) == (
        1280,
        3584,
        3420,
    )
    assert vision.fullatt_block_indexes == [7, 15, 23, 31]
    ids = (config.image_token_id, config.video_token_id)
    assert ids + (config.vision_start_token_id, config.vision_end_token_id) == (
        151655,
        151656,
        151652,
        151653,
    )
    sam = script.sam_config(script.PRESETS["real"], sam_layers=32).vision_config
    assert (sam.hidden_size, sam.mlp_dim, sam.num_attention_heads, sam.output_channels) == (
        1280,
        5120,
        16,
        256,
    )
    assert sam.global_attn_indexes == [7, 15, 23, 31]
    assert script.global_blocks(2) == [1] and script.global_blocks(1) == [0]


def test_real_size_tokenizer_puts_qwen_added_tokens_at_their_ids(script):
    tokenizer = script.qwen_style_tokenizer(151643)
    assert len(tokenizer) == 151665
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    expected |= {"<|vision_start|>": 151652, "<|image_pad|>": 151655, "<|file_sep|>": 151664}
    for token, token_id in expected.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    decoder = tokenizer.added_tokens_decoder
    assert decoder[151656].special and not decoder[151657].special  # <|video_pad|>, <tool_call>
    ids = tokenizer("<|im_start|>user\nthe knife<|im_end|>")["input_ids"]
    assert ids[0] == 151644 and ids[-1] == 151645
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nthe knife"


@pytest.mark.slow
def test_a_reload_that_differs_fails_the_check(script, tmp_path, monkeypatch):
    """The reload check can fail: perturb one weight of the reloaded model."""
    model_class = script.SegCompassForReasoningSegmentation
    original = model_class.from_pretrained.__func__

    def perturbed(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        with torch.no_grad():
            model.mask_decoder.iou_token.weight.add_(0.5)
        return model

    monkeypatch.setattr(model_class, "from_pretrained", classmethod(perturbed))
    code, stdout, stderr = run_main(
        script, ["--preset", "tiny", "--workdir", str(tmp_path), "--optimizer", "none"]
    )
    assert code == 1
    assert "Setup check FAILED in step 'reload check (2 forwards)'" in stderr
    rows = table_rows(stdout)
    assert rows["optimizer step"][0] == "skipped"
    assert rows["reload check (2 forwards)"][0].endswith("FAILED")
    assert rows["segment"][0] != "skipped" and "result: FAILED" in stdout


def test_bad_arguments_exit_with_a_message(script):
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()):
        script.main(["--text-layers", "0"])
    assert exit_info.value.code == 2
