"""A reduced-size run of the embedded default, end to end (what `make demo` runs at full size)."""

import json

from modeling_segcompass.demo import run_demo


def test_quick_demo_runs_every_stage_and_reloads_through_remote_code(tmp_path):
    summary = run_demo(tmp_path / "demo", minutes=2, quick=True, seed=0)
    expected_stages = {
        "data", "sae_pretraining", "supervised_warmup", "eval_warmup", "grpo", "evaluation",
        "interpretability", "export_and_reload",
    }  # fmt: skip
    assert expected_stages <= set(summary.stage_times_s)
    assert summary.sft_steps == 3 and summary.grpo_steps == 1
    # the SAE was really trained: topk L0 is k and the reconstruction improved
    assert summary.sae["l0"] == 16
    assert summary.sae["fvu"] < summary.sae["initial_fvu"]
    evaluation = json.loads((tmp_path / "demo" / "evaluation.json").read_text())
    for key in ("oracle_cot", "end_to_end_warmup", "end_to_end"):
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
