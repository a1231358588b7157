"""A reduced-size run of the embedded default, end to end (what `make demo` runs at full size)."""

import json

from modeling_segcompass.demo import run_demo


def test_quick_demo_runs_every_stage_and_reloads_through_remote_code(tmp_path):
    summary = run_demo(tmp_path / "demo", minutes=2, quick=True, seed=0)
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
    assert "SegCompass demo finished" in summary.to_text()


def test_time_schedule_warms_up_by_steps_then_decays_on_wall_time(monkeypatch):
    from types import SimpleNamespace

    import torch

    import modeling_segcompass.demo as demo

    clock = {"now": 100.0}
    monkeypatch.setattr(demo.time, "time", lambda: clock["now"])
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [weights[0]], "lr": 1.0},
                                 {"params": [weights[1]], "lr": 0.5}])  # fmt: skip
    callback = demo._time_schedule_callback(deadline=200.0, warmup_steps=4)
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
