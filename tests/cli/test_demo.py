"""A reduced-size run of the embedded default, end to end (what `make demo` runs at full size)."""

import json

import pytest
import torch

from modeling_segcompass.demo.run import run_demo


def assert_final_sae_exported(demo):
    """sae/ holds the SAE of the final model (the one in hub_model/), with the hook SAELens
    needs to place it."""
    from safetensors.torch import load_file

    layer = json.loads((demo / "hub_model" / "config.json").read_text())["sae_layer"]
    cfg = json.loads((demo / "sae" / "cfg.json").read_text())
    assert (cfg["hook_name"], cfg["hook_layer"]) == (f"blocks.{layer}.hook_resid_post", layer)
    assert cfg["metadata"]["hook_name"] == cfg["hook_name"]
    final = load_file(demo / "hub_model" / "model.safetensors")
    for name, tensor in load_file(demo / "sae" / "sae_weights.safetensors").items():
        assert torch.equal(tensor, final[f"sae.{name}"]), name


#: The progress bar of each demo stage (its tqdm description).
STAGE_BARS = ("data and tokenizer", "VLM pretraining", "caching activations", "training SAE",
              "supervised warm-up", "image dependence", "eval", "GRPO",
              "interpretability report", "export and reload")  # fmt: skip


def assert_every_stage_counts_steps(stderr):
    """Each stage draws a bar; bars count steps, none counts budget seconds ("1.01s/s")."""
    import re

    for name in STAGE_BARS:
        assert re.search(rf"{name}[^:]*: ", stderr), name
    assert not re.search(r"\ds/s\b", stderr)
    assert re.search(r"supervised warm-up: 100%.* 3/3 ", stderr)
    assert re.search(r"training SAE: 100%.* 20/20 ", stderr)


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reloads_through_remote_code(tmp_path, capfd):
    # the answer-span readout (docs/interpretability.md), its token fields given as words
    span = {
        "codebook_span_start_token_id": ":",
        "codebook_span_end_token_ids": ["Ġ", "</think>", "<REF_POS>"],
        "slot_mapper_ref_input": False,
    }
    summary = run_demo(
        tmp_path / "demo", minutes=2, quick=True, seed=0, processes=1, config_overrides=span
    )
    assert_every_stage_counts_steps(capfd.readouterr().err)
    curves = tmp_path / "demo" / "training_curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected_stages = {
        "data", "vlm_pretraining", "sae_pretraining", "supervised_warmup", "eval_warmup", "grpo", "evaluation",
        "interpretability", "export_and_reload",
    }  # fmt: skip
    assert expected_stages <= set(summary.stage_times_s)
    assert summary.sft_steps == 3 and summary.grpo_steps == 1
    # the SAE was really trained: topk L0 is k and the reconstruction improved
    assert summary.sae["l0"] == 16
    assert summary.sae["fvu"] < summary.sae["initial_fvu"]
    evaluation = json.loads((tmp_path / "demo" / "evaluation.json").read_text())
    assert summary.vlm_pretraining["steps"] == 3
    assert set(summary.image_dependence) >= {"loss_right_image", "loss_other_image", "gap"}
    for key in ("oracle_cot_warmup", "oracle_cot", "end_to_end_warmup", "end_to_end"):
        overall = evaluation[key]["overall"]
        assert 0.0 <= overall["gIoU"] <= 1.0 and overall["n"] == summary.num_held_out
        assert "| overall |" in evaluation[key]["table"]
    # the exported folder was loaded where the package could not be imported
    assert summary.reload_check["class_module"].startswith("transformers_modules.")
    assert 0.0 <= summary.reload_check["iou"] <= 1.0
    for path in summary.files.values():
        assert (tmp_path / "demo").exists() and __import__("pathlib").Path(path).exists(), path
    hub = tmp_path / "demo" / "hub_model"
    assert (hub / "model.safetensors").exists() and (hub / "README.md").exists()
    assert (hub / "concept_labels.json").exists()
    # the words became ids of the demo's tokenizer in the exported config
    config = json.loads((hub / "config.json").read_text())
    vocab = json.loads((tmp_path / "demo" / "tokenizer" / "tokenizer.json").read_text())
    vocab = vocab["model"]["vocab"] | {t["content"]: t["id"] for t in vocab["added_tokens"]}
    assert config["slot_mapper_ref_input"] is False
    assert config["codebook_span_start_token_id"] == vocab["Ġ:"]
    assert config["codebook_span_end_token_ids"] == [
        vocab[t] for t in ("Ġ", "</think>", "<REF_POS>")
    ]
    assert_final_sae_exported(tmp_path / "demo")
    # no empty folder is left behind (the trainers' sft/ and grpo/ hold no checkpoint)
    assert not [p for p in (tmp_path / "demo").rglob("*") if p.is_dir() and not any(p.iterdir())]
    text = summary.to_text()
    assert "# SegCompass demo summary" in text and "- reload: ok" in text
    assert (tmp_path / "demo" / "summary.md").read_text().strip() == text.strip()


@pytest.mark.slow
def test_quick_demo_on_two_processes_trains_data_parallel_and_exports_one_model(tmp_path, capfd):
    """The acceptance run: the reduced-size demo with its training stages on 2 gloo ranks
    ends with one Hub-ready model that reloads through remote code, and a summary."""
    from PIL import Image

    demo = tmp_path / "demo"
    summary = run_demo(demo, minutes=2, quick=True, seed=0, processes=2)
    err = capfd.readouterr().err
    assert summary.processes == 2 and summary.replicas_identical is True
    assert set(summary.peak_memory_mb) == {"rank0", "rank1"}
    assert all(value > 0 for value in summary.peak_memory_mb.values())
    # the same steps and stages as on one process
    assert summary.vlm_pretraining["steps"] == 3
    assert summary.sft_steps == 3 and summary.grpo_steps == 1
    for stage in ("vlm_pretraining", "sae_pretraining", "supervised_warmup", "grpo"):
        assert summary.steps_per_s[stage] > 0, stage
    assert_every_stage_counts_steps(err)
    saved = json.loads((demo / "summary.json").read_text())
    assert saved["processes"] == 2 and saved["end_to_end"]["overall"]["n"] == 14
    assert (demo / "summary.md").read_text().startswith("# SegCompass demo summary")
    assert "- reload: ok" in (demo / "summary.md").read_text()
    assert summary.reload_check["class_module"].startswith("transformers_modules.")
    with Image.open(demo / "training_curves.png") as image:
        assert image.size[0] > 0
    # one model and one SAE, written by rank 0; nothing left from rank 1
    assert_final_sae_exported(demo)
    assert sorted(p.name for p in demo.iterdir() if p.name.startswith(".")) == []


def test_demo_uses_two_processes_when_two_cores_are_available(monkeypatch):
    import modeling_segcompass.demo.processes as processes

    monkeypatch.setattr(processes.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert processes.default_processes() == 2
    monkeypatch.setattr(processes.os, "sched_getaffinity", lambda pid: {3})
    assert processes.default_processes() == 1
    with pytest.raises(ValueError, match="processes must be an int"):
        run_demo("unused", processes=0)


def test_time_schedule_warms_up_by_steps_then_decays_on_wall_time(monkeypatch):
    from types import SimpleNamespace

    import torch

    import modeling_segcompass.demo.schedule as schedule

    clock = {"now": 100.0}
    monkeypatch.setattr(schedule.time, "time", lambda: clock["now"])
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [weights[0]], "lr": 1.0},
                                 {"params": [weights[1]], "lr": 0.5}])  # fmt: skip
    callback = schedule.time_schedule_callback(deadline=200.0, warmup_steps=4)
    state = SimpleNamespace(global_step=0)
    callback.on_train_begin(None, state, None, optimizer=optimizer)

    def lrs_at(step, now):
        state.global_step, clock["now"] = step, now
        callback.on_step_begin(None, state, None, optimizer=optimizer)
        return [group["lr"] for group in optimizer.param_groups]

    assert lrs_at(0, 100.0) == [0.25, 0.125]  # warm-up: (step + 1) / 4, per group
    assert lrs_at(3, 110.0) == [1.0, 0.5]
    # the cosine starts at the first post-warm-up step (t = 120) and ends at the deadline
    assert lrs_at(4, 120.0) == [1.0, 0.5]
    assert lrs_at(5, 160.0) == [0.55, 0.275]  # half way: 0.1 + 0.9 * 0.5
    assert lrs_at(6, 200.0) == [0.1, 0.05]
    assert lrs_at(7, 500.0) == [0.1, 0.05]  # past the deadline: the floor
    logs = {"learning_rate": 123.0}
    callback.on_log(None, state, None, logs=logs)
    assert logs["learning_rate"] == 0.1


@pytest.mark.slow
def test_reload_step_takes_a_relative_output_folder_from_another_working_directory(
    tmp_path, monkeypatch
):
    """`make demo` passes the relative `demo_output`; the reload child runs inside the exported
    folder, so a relative path must not reach it as-is (it would be looked up on the Hub)."""
    from pathlib import Path

    import torch
    from PIL import Image

    from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
    from modeling_segcompass.demo.reload import reload_in_fresh_process
    from modeling_segcompass.demo.summary import DemoSummary, write_summary
    from modeling_segcompass.serving.hub import export
    from tests.helpers import build_tiny_tokenizer_and_processor

    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    workdir = tmp_path / "elsewhere"
    (workdir / "demo_output").mkdir(parents=True)
    monkeypatch.chdir(workdir)
    export(model.eval(), processor, Path("demo_output/hub_model"), repo_id="local/x", toy=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save("demo_output/example.png")

    result = reload_in_fresh_process(
        Path("demo_output/hub_model"), Path("demo_output/example.png"), "the red square", 6
    )
    assert result["class_module"].startswith("transformers_modules.")
    assert result["instruction"] == "the red square"
    assert len(result["mask"]) == 32 and len(result["mask"][0]) == 32

    # The summary records the reload in summary.md, as `.ci/run` checks it.
    summary = DemoSummary(output_dir="demo_output", wall_time_s=1.0)
    summary.reload_check = {**{k: v for k, v in result.items() if k != "mask"}, "ok": True}
    write_summary(summary, Path("demo_output"))
    text = Path("demo_output/summary.md").read_text()
    assert "- reload: ok" in text and "transformers_modules." in text


def test_reload_step_refuses_a_folder_without_an_export(tmp_path, monkeypatch):
    from pathlib import Path

    import pytest

    from modeling_segcompass.demo.reload import reload_in_fresh_process

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        reload_in_fresh_process(Path("nothing_here"), Path("x.png"), "the red square", 6)


def test_step_progress_counts_steps_with_the_time_left(monkeypatch, capsys):
    from types import SimpleNamespace

    import modeling_segcompass.demo.schedule as schedule

    monkeypatch.setattr(schedule.time, "time", lambda: 100.0)
    callback = schedule.time_progress_callback(deadline=160.0, description="GRPO")
    state = SimpleNamespace(global_step=0)
    callback.on_train_begin(None, state, None)
    for step in (1, 2, 3):
        state.global_step = step
        callback.on_log(None, state, None, logs={"loss": 0.5, "reward": 0.25})
        callback.on_step_end(None, state, None)
    assert callback.bar.n == 3 and callback.bar.total is None and callback.bar.unit == "step"
    assert callback.shown == {"left": "60s", "loss": "0.500", "reward": "0.250"}
    callback.on_train_end(None, state, None)
    assert "GRPO: 3step" in capsys.readouterr().err


def test_training_curves_draw_a_panel_per_stage_from_the_logs(tmp_path):
    from modeling_segcompass.demo.curves import collect_curves, plot_training_curves

    curves = collect_curves(
        vlm_losses=[3.0, 2.0, 1.5],
        sae_losses=[1.0, 0.5],
        sft_log=[{"step": 1, "loss": 2.0, "seg_loss": 1.0}, {"step": 2, "loss": 1.5}],
        grpo_log=[{"step": 1, "reward": 0.2, "rewards/multi_object_mask_reward/mean": 0.1,
                   "seg_loss": 0.7}],
    )  # fmt: skip
    assert curves["supervised warm-up"] == {
        "total loss": [(1.0, 2.0), (2.0, 1.5)],
        "segmentation": [(1.0, 1.0)],
    }
    assert curves["GRPO rewards"] == {"total reward": [(1.0, 0.2)], "mask reward": [(1.0, 0.1)]}
    assert curves["VLM pretraining (image descriptions)"]["LM loss"][-1] == (3.0, 1.5)
    path = plot_training_curves(curves, tmp_path / "curves.png")
    from PIL import Image

    with Image.open(path) as image:
        assert image.size == (1500, 720)


def test_demo_config_overrides_are_parsed_checked_and_reach_the_model():
    from modeling_segcompass.cli.common import CLIError
    from modeling_segcompass.cli.demo_command import parse_config_overrides
    from modeling_segcompass.demo.run import _check_config_overrides

    parsed = parse_config_overrides(["codebook_dim=64", "sae_activation=topk", "x=[1, 2]"])
    assert parsed == {"codebook_dim": 64, "sae_activation": "topk", "x": [1, 2]}
    with pytest.raises(CLIError, match="KEY=VALUE"):
        parse_config_overrides(["codebook_dim"])
    _check_config_overrides({"codebook_dim": 64})
    with pytest.raises(ValueError, match="unknown SegCompassConfig field"):
        _check_config_overrides({"codebok_dim": 64})
    with pytest.raises(ValueError, match="num_slots"):
        _check_config_overrides({"num_slots": 3})
