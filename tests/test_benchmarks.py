"""Smoke tests of benchmarks/: every agreement check at a very small size, and the harness.

No timing is asserted here (the machine is shared); what is asserted is that the reference
re-enactment and this package's path compute the same numbers, that the checks would catch
a path that computes something else, and that the measuring tools measure what they claim.
"""

from __future__ import annotations

import importlib
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from benchmarks import (
    bench_concept_path,
    bench_forward_backward,
    bench_grpo_step,
    bench_inference,
    bench_mask_decoding,
    bench_training_step,
    reference_path,
)
from benchmarks.harness import (
    Timings,
    compare,
    interleaved_timing,
    peak_memory_bytes,
    require_agreement,
    verdict,
)
from modeling_segcompass import SegCompassConfig

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- harness
def test_compare_uses_tolerance_relative_to_the_reference_scale():
    ref = torch.tensor([100.0, -2.0, 0.5])
    close = ref + torch.tensor([0.0, 0.009, 0.0])  # 0.009 <= 1e-6 + 1e-4 * 100
    far = ref + torch.tensor([0.0, 0.02, 0.0])
    ok = compare("x", close, ref, atol=1e-6, rtol=1e-4)
    bad = compare("x", far, ref, atol=1e-6, rtol=1e-4)
    assert ok.ok and abs(ok.max_abs_diff - 0.009) < 1e-6 and ok.reference_max_abs == 100.0
    assert not bad.ok and "FAILED" in bad.line()


def test_compare_refuses_shape_mismatch_and_non_finite_values():
    try:
        compare("x", torch.zeros(2, 3), torch.zeros(3, 2), atol=0, rtol=0)
    except AssertionError as error:
        assert "(2, 3)" in str(error) and "(3, 2)" in str(error)
    else:
        raise AssertionError("a shape mismatch must be refused")
    try:
        compare("x", torch.tensor([float("nan")]), torch.zeros(1), atol=1, rtol=1)
    except AssertionError as error:
        assert "non-finite" in str(error)
    else:
        raise AssertionError("NaN must be refused")


def test_require_agreement_raises_naming_the_failed_output():
    good = compare("good", torch.ones(3), torch.ones(3), atol=0, rtol=0)
    bad = compare("bad", torch.ones(3), torch.zeros(3), atol=0, rtol=0)
    require_agreement([good])
    try:
        require_agreement([good, bad])
    except AssertionError as error:
        assert "['bad']" in str(error)
    else:
        raise AssertionError("a failed agreement must stop the benchmark")


def test_interleaved_timing_alternates_order_and_counts_repeats():
    calls: list[str] = []
    timings = interleaved_timing(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=3,
        warmup=1,
        device=CPU,
    )
    # warm-up a b, then rounds: a b | b a | a b
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in timings.seconds.values()] == [3, 3]
    assert [len(v) for v in timings.cpu_seconds.values()] == [3, 3]
    assert all(t >= 0 for v in timings.seconds.values() for t in v)


def test_timings_ratios_wall_clock_paired_and_cpu():
    timings = Timings(
        {"fast": [1.0, 5.0, 2.0], "slow": [4.0, 4.0, 100.0]},
        {"fast": [1.0, 1.0, 1.0], "slow": [3.0, 3.0, 3.0]},
    )
    assert timings.median("fast") == 2.0 and timings.median("slow") == 4.0
    assert timings.ratio("fast", "slow") == 0.5
    # per-round ratios 0.25, 1.25, 0.02: a burst in one round does not move the median
    assert timings.paired_ratio("fast", "slow") == 0.25
    assert abs(timings.paired_ratio("fast", "slow", cpu=True) - 1 / 3) < 1e-12


def test_paired_ratio_interval_is_a_t_interval_on_the_log_ratios():
    # per-round ratios 2, 2, 2: no spread, the interval is the point
    same = Timings({"a": [2.0, 4.0, 6.0], "b": [1.0, 2.0, 3.0]}, {"a": [1.0] * 3, "b": [1.0] * 3})
    assert all(abs(v - 2.0) < 1e-12 for v in same.paired_ratio_interval("a", "b"))
    # ratios e^0, e^1, e^2: mean log 1, sd 1, t(0.975, 2) = 4.303 -> e^(1 +- 4.303 / sqrt(3))
    e = math.e
    spread = Timings({"a": [1.0, e, e * e], "b": [1.0] * 3}, {"a": [1.0] * 3, "b": [1.0] * 3})
    mean, low, high = spread.paired_ratio_interval("a", "b")
    half = 4.302652729911275 / math.sqrt(3)
    assert abs(mean - e) < 1e-9 and abs(low - math.exp(1 - half)) < 1e-6
    assert abs(high - math.exp(1 + half)) < 1e-6
    # inverting the ratio inverts the interval; cpu times give their own
    inv = spread.paired_ratio_interval("b", "a")
    assert abs(inv[1] * high - 1) < 1e-9 and abs(inv[2] * low - 1) < 1e-9
    assert spread.paired_ratio_interval("a", "b", cpu=True) == (1.0, 1.0, 1.0)
    one = Timings({"a": [3.0], "b": [1.0]}, {"a": [1.0], "b": [1.0]})
    assert all(abs(v - 3.0) < 1e-12 for v in one.paired_ratio_interval("a", "b"))


def test_every_benchmark_takes_the_device_and_run_all_passes_it(monkeypatch):
    """`make bench BENCH_DEVICE=cuda` = `run_all.py --device cuda`: every script parses
    --device, run_all hands it to each (CPU-process benchmarks say they are skipped), and
    asking for CUDA where there is none is refused with the fix."""
    import subprocess

    from benchmarks import harness, run_all

    for name, (script, _) in run_all.BENCHMARKS.items():
        module = importlib.import_module(f"benchmarks.{script[:-3]}")
        assert module.parse_args(["--device", "cuda"]).device == "cuda", name
    launched: list[list[str]] = []

    class FakeProcess:
        def __init__(self, command, **kwargs):
            launched.append(command)
            self.stdout = iter(["RESULT fake\n"])

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    assert run_all.main(["--device", "cuda"]) == 0
    ran = {Path(c[1]).name for c in launched}
    assert ran == {s for n, (s, _) in run_all.BENCHMARKS.items() if n not in run_all.CPU_ONLY}
    assert all(c[2:4] == ["--device", "cuda"] for c in launched)
    monkeypatch.undo()  # the real Popen again (the allocator's libc lookup may run ldconfig)
    makefile = (Path(run_all.__file__).parents[1] / "Makefile").read_text()
    assert "BENCH_DEVICE ?= cpu" in makefile and "--device $(BENCH_DEVICE)" in makefile
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            harness.setup(None, "cuda")


def test_peak_memory_counts_simultaneous_tensors_not_the_sum_of_all():
    mib = 1024 * 1024

    def two_at_once():
        a = torch.ones(4 * mib // 4)  # 4 MiB
        b = torch.ones(4 * mib // 4)  # 4 MiB, both alive
        return float(a[0] + b[0])

    def one_after_another():
        for _ in range(3):  # 3 x 4 MiB allocated, never two at a time
            a = torch.ones(4 * mib // 4)
            del a

    both = peak_memory_bytes(two_at_once, CPU)
    sequential = peak_memory_bytes(one_after_another, CPU)
    assert 8 * mib <= both < 9 * mib
    assert 4 * mib <= sequential < 5 * mib


def test_verdict_direction():
    assert "met" in verdict(0.5, 0.55, higher_is_better=False)
    assert "MISSED" in verdict(0.6, 0.55, higher_is_better=False)
    assert "met" in verdict(60.0, 50.0, higher_is_better=True)
    assert "MISSED" in verdict(1.5, 2.0, higher_is_better=True)


# --------------------------------------------------------------------------- benchmark 1
SMALL_VLM = bench_forward_backward.ProportionalSize(
    hidden=64, layers=3, heads=4, kv_heads=2, vocab=256, seq_len=96, image_px=64,
    codebook_dim=32, sae_ratio=8, sae_k=8,
)  # fmt: skip


def test_forward_backward_paths_agree_on_outputs_and_every_gradient():
    model, inputs = bench_forward_backward.build(SMALL_VLM, CPU)
    # the batch has padding and rows with different <REF_POS> counts
    assert (inputs["attention_mask"] == 0).any()
    agreements = bench_forward_backward.check_agreement(model, inputs)
    names = {a.name for a in agreements}
    assert {"loss", "mask_logits", "grad[vlm]", "grad[sae]", "grad[codebook]"} <= names
    assert all(a.ok for a in agreements), [a.line() for a in agreements if not a.ok]
    loss = next(a for a in agreements if a.name == "loss")
    assert loss.reference_max_abs > 0  # a real loss was compared, not two zeros


def test_forward_backward_check_catches_upstream_slot_order(monkeypatch):
    """Upstream orders the slots latest <REF_POS> first; feeding that order must be caught."""
    original = reference_path.gather_ref_hidden_states

    def latest_first(hidden, input_ids, ref_token_id, num_slots):
        states, present = original(hidden, input_ids, ref_token_id, num_slots)
        return states.flip(1), present.flip(1)

    monkeypatch.setattr(reference_path, "gather_ref_hidden_states", latest_first)
    model, inputs = bench_forward_backward.build(SMALL_VLM, CPU)
    agreements = bench_forward_backward.check_agreement(model, inputs)
    failed = {a.name for a in agreements if not a.ok}
    assert {"heatmap_logits", "conf_logits", "grad[vlm]"} <= failed, failed


def test_reference_reads_the_sae_layer_output_that_the_hook_captures():
    model, inputs = bench_forward_backward.build(SMALL_VLM, CPU)
    captured = {}
    layer = model.vlm.model.language_model.layers[model.config.sae_layer]
    handle = layer.register_forward_hook(
        lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        out = model.vlm(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
            output_hidden_states=True, use_cache=False,
        )  # fmt: skip
    handle.remove()
    hooked = captured["h"]
    assert torch.equal(out.hidden_states[model.config.sae_layer + 1], hooked)
    assert not torch.allclose(out.hidden_states[model.config.sae_layer], hooked)


# --------------------------------------------------------------------------- benchmark 2
SMALL_CONCEPT = bench_concept_path.ConceptSize(
    d_in=64, d_sae=1024, seq_len=40, num_slots=3, codebook_dim=32, codebook_heads=4,
    topk=8, target_l0=12,
)  # fmt: skip


def test_concept_paths_agree_in_both_modes():
    for mode in bench_concept_path.MODES:
        setup = bench_concept_path.build(mode, SMALL_CONCEPT, CPU)
        agreements, stats = bench_concept_path.check_agreement(setup)
        assert all(a.ok for a in agreements), (mode, [a.line() for a in agreements])
        if mode == "topk":
            assert stats["mean_l0"] == stats["max_l0"] == SMALL_CONCEPT.topk
        else:  # inputs scaled for ~target_l0 latents above the 2.0 threshold
            assert 0.5 * SMALL_CONCEPT.target_l0 < stats["mean_l0"] < 2 * SMALL_CONCEPT.target_l0
            assert float(stats["values"][stats["values"] != 0].min()) >= SMALL_CONCEPT.threshold


def test_concept_check_catches_a_reference_that_forgets_the_threshold(monkeypatch):
    original = reference_path.reference_codebook_tokens
    monkeypatch.setattr(
        bench_concept_path,
        "reference_codebook_tokens",
        lambda codebook, codes, threshold: original(codebook, codes, 0.0),
    )
    setup = bench_concept_path.build("threshold", SMALL_CONCEPT, CPU)
    agreements, _ = bench_concept_path.check_agreement(setup)
    failed = {a.name for a in agreements if not a.ok}
    assert "codebook token embeddings" in failed


def test_reference_sae_decodes_the_dense_codes_it_returns():
    setup = bench_concept_path.build("topk", SMALL_CONCEPT, CPU)
    with torch.no_grad():
        out = reference_path.reference_sae(setup.sae, setup.hidden)
        ours = setup.sae.encode_dense(setup.hidden)
        expected = out.codes @ setup.sae.W_dec + setup.sae.b_dec
    assert torch.equal(out.codes, ours)  # same codes as the package's dense encoder
    assert torch.allclose(out.reconstruction, expected)
    assert ((out.codes != 0).sum(-1) == SMALL_CONCEPT.topk).all()


# --------------------------------------------------------------------------- benchmark 3
def test_mask_decoding_paths_agree_at_tiny_and_sam_sizes():
    for size, batch, slots in (("tiny", 3, 2), ("sam", 2, 1)):
        model, heatmaps, embeddings = bench_mask_decoding.build(size, batch, slots, CPU)
        agreements = bench_mask_decoding.check_agreement(model, heatmaps, embeddings)
        assert all(a.ok for a in agreements), (size, [a.line() for a in agreements])
    assert model.config.mask_size == 256 and model.config.image_embedding_channels == 256


def test_decode_masks_in_chunks_of_images_gives_the_same_masks(monkeypatch):
    """`max_images_per_decoder_call` splits B images into calls; the numbers do not change."""
    from modeling_segcompass import modeling_segcompass as modeling_module

    calls = []
    decode = modeling_module.decode_single_masks

    def counting(decoder, dense, *args):
        calls.append(dense.shape[0] * dense.shape[1])
        return decode(decoder, dense, *args)

    monkeypatch.setattr(modeling_module, "decode_single_masks", counting)
    for size, batch, slots in (("tiny", 5, 3), ("sam", 3, 2)):
        model, heatmaps, embeddings = bench_mask_decoding.build(size, batch, slots, CPU)
        calls.clear()
        with torch.no_grad():
            model.config.max_images_per_decoder_call = None
            whole = model.decode_masks(heatmaps, embeddings)
            model.config.max_images_per_decoder_call = 2
            chunked = model.decode_masks(heatmaps, embeddings)
        # one call of B*K prompts, then ceil(B / 2) calls of at most 2*K
        assert calls == [batch * slots] + [2 * slots] * (batch // 2) + [slots] * (batch % 2)
        for a, b in zip(chunked, whole, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_auto_images_per_decoder_call_follows_the_sizes_and_the_device():
    """ "auto" keeps one call's (b*K, C, E, E) sum within the device's budget: at SAM's size
    (C 256, E 64) on a CPU one image's 4 prompts (16 MiB) per call, the tiny default's whole
    batch; on a GPU 16 SAM images per call; ints and None are used as given."""
    sam, heatmaps, embeddings = bench_mask_decoding.build("sam", 3, 4, CPU)
    tiny, _, _ = bench_mask_decoding.build("tiny", 3, 4, CPU)
    assert sam.config.max_images_per_decoder_call == "auto"  # the default
    assert sam.images_per_decoder_call(8, 4, CPU) == 1
    assert sam.images_per_decoder_call(8, 2, CPU) == 2
    assert sam.images_per_decoder_call(64, 4, torch.device("cuda")) == 16
    assert tiny.images_per_decoder_call(64, 4, CPU) == 64
    sam.config.max_images_per_decoder_call = 2
    assert sam.images_per_decoder_call(8, 4, CPU) == 2
    sam.config.max_images_per_decoder_call = None
    assert sam.images_per_decoder_call(8, 4, CPU) == 8
    for bad in ("Auto", 0, 1.5, True):
        with pytest.raises(ValueError, match="max_images_per_decoder_call"):
            SegCompassConfig.tiny(max_images_per_decoder_call=bad)


def test_decode_masks_gradients_match_transformers_mask_decoder_per_image():
    """`decode_masks` runs SamMaskDecoder's sub-modules itself (broadcast image, first mask
    only, in "auto" chunks); its masks, IoU and every gradient match transformers' own forward
    called per image (the reference loop) up to float32 summation order."""
    model, heatmaps, embeddings = bench_mask_decoding.build("tiny", 4, 3, CPU)
    model.train()
    results = []
    for decode in (model.decode_masks, partial(reference_path.reference_decode_masks, model)):
        model.zero_grad(set_to_none=True)
        h = heatmaps.clone().requires_grad_(True)
        e = embeddings.clone().requires_grad_(True)
        masks, iou = decode(h, e)
        (masks.square().mean() + masks.mean() + iou.square().sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((masks.detach(), iou.detach(), h.grad, e.grad, grads))
    (m1, u1, h1, e1, g1), (m2, u2, h2, e2, g2) = results
    assert sorted(g1) == sorted(g2) and any(n.startswith("mask_decoder.") for n in g1)
    for a, b in [(m1, m2), (u1, u2), (h1, h2), (e1, e2)] + [(g1[n], g2[n]) for n in g2]:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_decode_masks_runs_other_convolutions_as_modules():
    """The per-cell forms need SAM's 2x2 stride-2 convolutions; any other convolution class
    in the mask embedding or the upscaling is run as a module, with the same numbers."""

    class Conv(torch.nn.Conv2d):
        pass

    class Transposed(torch.nn.ConvTranspose2d):
        pass

    model, heatmaps, embeddings = bench_mask_decoding.build("tiny", 3, 2, CPU)
    with torch.no_grad():
        fast = model.decode_masks(heatmaps, embeddings)
        for owner, name in (
            (model.prompt_encoder.mask_embed, "conv1"),
            (model.prompt_encoder.mask_embed, "conv2"),
            (model.mask_decoder, "upscale_conv1"),
        ):
            conv = getattr(owner, name)
            kind = Transposed if isinstance(conv, torch.nn.ConvTranspose2d) else Conv
            swapped = kind(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride)
            swapped.load_state_dict(conv.state_dict())
            setattr(owner, name, swapped)
        modules = model.decode_masks(heatmaps, embeddings)
        reference = reference_path.reference_decode_masks(model, heatmaps, embeddings)
    for a, b, c in zip(fast, modules, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-4)


def test_mask_decoding_check_catches_a_loop_that_pairs_prompts_with_other_images(monkeypatch):
    original = reference_path.reference_decode_masks
    monkeypatch.setattr(
        bench_mask_decoding,
        "reference_decode_masks",
        lambda model, heatmaps, embeddings: original(model, heatmaps, embeddings.flip(0)),
    )
    model, heatmaps, embeddings = bench_mask_decoding.build("tiny", 3, 2, CPU)
    agreements = bench_mask_decoding.check_agreement(model, heatmaps, embeddings)
    assert not next(a for a in agreements if a.name == "mask_logits").ok


# --------------------------------------------------------------------------- benchmark 4
def test_grpo_steps_agree_with_zero_mask_weights_and_differ_by_the_mask_loss(tmp_path):
    setup = bench_grpo_step.build("tiny", CPU, batch=4, completion_len=20, output_dir=str(tmp_path))
    assert (setup.batch["completion_mask"] == 0).any()  # rows of different lengths
    agreements = bench_grpo_step.check_agreement(setup)
    assert {a.name for a in agreements} == {
        "loss (mask weights 0)",
        "grad[vlm] (mask weights 0)",
        "grad[mask path] (weight 0)",
    }
    assert all(a.ok for a in agreements), [a.line() for a in agreements if not a.ok]
    assert next(a for a in agreements if a.name.startswith("grad[vlm]")).reference_max_abs > 0
    # the weights are restored: the timed step carries the mask loss, the other does not
    assert setup.trainer.args.seg_loss_weight == 1.0
    with_mask = bench_grpo_step.step(setup, bench_grpo_step.with_mask_loss)
    mask_grads = bench_grpo_step._grads(setup.model)
    policy = bench_grpo_step.step(setup, bench_grpo_step.policy_only_loss)
    policy_grads = bench_grpo_step._grads(setup.model)
    assert (
        float(with_mask - policy) > 0.1
    )  # seg + 0.2 conf + sae weight x sae of an untrained model
    assert any(n.startswith("mask_decoder.") for n in mask_grads)
    assert not any(n.startswith(("mask_decoder.", "sae.", "codebook.")) for n in policy_grads)


def test_grpo_check_catches_a_policy_step_with_other_advantages(tmp_path, monkeypatch):
    original = bench_grpo_step.policy_only_loss

    def flipped(setup):
        setup.batch["advantages"] = -setup.batch["advantages"]
        try:
            return original(setup)
        finally:
            setup.batch["advantages"] = -setup.batch["advantages"]

    monkeypatch.setattr(bench_grpo_step, "policy_only_loss", flipped)
    setup = bench_grpo_step.build("tiny", CPU, batch=4, completion_len=20, output_dir=str(tmp_path))
    failed = {a.name for a in bench_grpo_step.check_agreement(setup) if not a.ok}
    assert {"loss (mask weights 0)", "grad[vlm] (mask weights 0)"} <= failed


# --------------------------------------------------------------------------- benchmark 5
def test_batched_segment_agrees_with_batch_one_calls():
    model, processor, images, instructions, tokens = bench_inference.build(
        3, CPU, corpus=60, vocab_size=400
    )
    assert tokens > 5  # pinned completion length covers a gold response
    agreements = bench_inference.check_agreement(model, processor, images, instructions, 10)
    assert all(a.ok for a in agreements), [a.line() for a in agreements]


def test_training_step_paths_agree_and_the_check_catches_a_reconstruction_gradient_leak(
    monkeypatch,
):
    """Benchmark 7's check: the optimised warm-up and GRPO steps give the straightforward
    path's loss and gradients; a reconstruction loss whose gradient reaches the VLM (codes of
    the undetached input) is caught."""
    steps = bench_training_step.build(CPU, batch=3, grpo_batch=2, completion_len=24)
    agreements = bench_training_step.check_agreement(steps)
    assert len(agreements) == 4 and all(a.ok for a in agreements), [a.line() for a in agreements]
    assert any(a.max_abs_diff == 0 for a in agreements)  # the losses are the same numbers

    def leaking_pair(self, sae_input):
        return self.encode(sae_input), self.encode(sae_input)

    monkeypatch.setattr(type(steps.model.sae), "encode_pair", leaking_pair)
    agreements = bench_training_step.check_agreement(steps)
    assert not all(a.ok for a in agreements)


def test_demo_speedup_checks_out_the_earlier_commit_and_refuses_an_unknown_one(tmp_path):
    """Benchmark 8 times REF's code from a worktree of REF (its worker imports the package
    from the tree it is given), and names the fix when git does not know REF."""
    import subprocess

    from benchmarks import bench_demo_speedup

    root = bench_demo_speedup.ROOT
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    tree = tmp_path / "ref"
    bench_demo_speedup.add_worktree("HEAD", tree)
    try:
        assert (tree / "modeling_segcompass" / "demo" / "run.py").is_file()
        probe = (
            "import sys; from benchmarks.bench_demo_stages import import_package_from; "
            "print(import_package_from(sys.argv[1]).__file__)"
        )
        found = subprocess.run(
            [sys.executable, "-c", probe, str(tree)], cwd=root, capture_output=True, text=True
        )
        assert found.returncode == 0, found.stderr
        assert Path(found.stdout.strip()).resolve().is_relative_to(tree.resolve())
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root)
    with pytest.raises(SystemExit, match="--against REF"):
        bench_demo_speedup.add_worktree("no-such-ref-0000", tmp_path / "nothing")
