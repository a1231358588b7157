"""Benchmark 2: the concept path at paper dimensions, sparse (this package) vs dense (reference).

Concept path = SAE on the hidden states of every token -> query codebook -> K slot vectors,
at d_in 3584 (Qwen2.5-VL-7B), d_sae 65536, L 1024 tokens, K 4, d_q 512, 2 encoder layers.

- this package: `SparseAutoencoder.encode` (sparse codes, the dense pre-activation only per
  512-row chunk, selected in place) + `QueryCodebook` with the embedding-bag projection;
- reference: dense codes of every token, the dense decode (discarded), |a| < threshold
  zeroed on the dense (L, d_sae) matrix, dense (L, d_sae) @ (d_sae, d_q), same encoder.

Two SAE modes: "topk" (k = 64, this package's default) and "threshold" (relu codes with the
reference's |a| >= 2.0 cut; hidden states scaled so that about 64 latents per token pass it,
the L0 of a trained SAE). Forward only, under `torch.no_grad()`: the rollout-scoring pass of
GRPO (upstream's `compute_log_prob(forward_seg=True)`) and inference.

    python benchmarks/bench_concept_path.py [--seq-len 1024 --modes topk threshold]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    MIB,
    Agreement,
    compare,
    interleaved_timing,
    machine_summary,
    peak_memory_bytes,
    ratio_line,
    require_agreement,
    setup,
    timing_lines,
    verdict,
)
from benchmarks.reference_path import (  # noqa: E402
    reference_codebook_slots,
    reference_codebook_tokens,
    reference_sae,
)
from modeling_segcompass.query_codebook import QueryCodebook  # noqa: E402
from modeling_segcompass.sparse_autoencoder import SparseAutoencoder  # noqa: E402

TARGET_CODEBOOK_SPEEDUP = 50.0
TARGET_PATH_SPEEDUP = 2.0
TARGET_MEMORY_RATIO = 0.5
MODES = ("topk", "threshold")


@dataclass
class ConceptSize:
    """Dimensions of the concept path (defaults: the paper's)."""

    d_in: int = 3584
    d_sae: int = 65536
    seq_len: int = 1024
    num_slots: int = 4
    codebook_dim: int = 512
    codebook_heads: int = 8
    topk: int = 64
    threshold: float = 2.0
    target_l0: int = 64  # latents per token passing the threshold in "threshold" mode


@dataclass
class ConceptSetup:
    """The modules and inputs of one mode."""

    sae: SparseAutoencoder
    codebook: QueryCodebook
    hidden: torch.Tensor  # (1, L, d_in)
    attention_mask: torch.Tensor  # (1, L)


def build(mode: str, size: ConceptSize, device: torch.device) -> ConceptSetup:
    """Fresh SAE + codebook (SAELens-style init) and hidden states for `mode`.

    With unit-norm encoder columns, each pre-activation of N(0, s^2 I) inputs is N(0, s^2);
    s is chosen so that the expected number of latents with a >= threshold is `target_l0`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    torch.manual_seed(0)
    if mode == "topk":
        sae = SparseAutoencoder(d_in=size.d_in, d_sae=size.d_sae, architecture="topk", k=size.topk)
        scale = 1.0
    else:
        sae = SparseAutoencoder(
            d_in=size.d_in,
            d_sae=size.d_sae,
            architecture="relu",
            activation_threshold=size.threshold,
        )
        tail = size.target_l0 / size.d_sae
        scale = size.threshold / statistics.NormalDist().inv_cdf(1.0 - tail)
    codebook = QueryCodebook(
        d_sae=size.d_sae,
        codebook_dim=size.codebook_dim,
        num_slots=size.num_slots,
        num_layers=2,
        num_heads=size.codebook_heads,
        ffn_dim=4 * size.codebook_dim,
    )
    sae, codebook = sae.to(device).eval(), codebook.to(device).eval()
    hidden = scale * torch.randn(1, size.seq_len, size.d_in, device=device)
    attention_mask = torch.ones(1, size.seq_len, dtype=torch.long, device=device)
    return ConceptSetup(sae, codebook, hidden, attention_mask)


@torch.no_grad()
def sparse_path(s: ConceptSetup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This package: encode -> embedding-bag codebook -> slots. Returns (indices, values, tokens, slots)."""
    codes = s.sae.encode(s.hidden)
    out = s.codebook(codes.indices, codes.values, s.attention_mask, sparse=True)
    return codes.indices, codes.values, out.token_embeddings, out.slots


@torch.no_grad()
def dense_path(s: ConceptSetup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: dense encode + decode -> dense codebook -> slots. Returns (codes, tokens, slots)."""
    sae_out = reference_sae(s.sae, s.hidden)
    tokens = reference_codebook_tokens(s.codebook, sae_out.codes, s.sae.activation_threshold)
    slots = reference_codebook_slots(s.codebook, tokens, s.attention_mask)
    return sae_out.codes, tokens, slots


@torch.no_grad()
def check_agreement(
    s: ConceptSetup, *, atol: float = 1e-5, rtol: float = 1e-4
) -> tuple[list[Agreement], dict]:
    """Run both paths once; compare codes, token projections and slots.

    Returns the agreements and the codes each path produced (inputs of the codebook-stage
    timing). Tolerance: float32; the embedding bag sums ~64 rows in another order than the
    dense product's 65536-long dot products (mostly exact zeros), a few ulps of the largest
    term; the encoder layers then see inputs equal to ~1e-7 relative. rtol 1e-4 of the largest
    magnitude is a 100x margin; a wrong latent, a dropped threshold or a misplaced token
    changes values by O(1).
    """
    indices, values, tokens, slots = sparse_path(s)
    dense_codes, ref_tokens, ref_slots = dense_path(s)
    thr = s.sae.activation_threshold
    kept = dense_codes.masked_fill(dense_codes.abs() < thr, 0.0) if thr > 0 else dense_codes
    rebuilt = torch.zeros_like(kept).scatter_add_(-1, indices, values)  # (1, L, d_sae)
    l0 = (values != 0).sum(-1).float()
    stats = {
        "indices": indices,
        "values": values,
        "dense_codes": dense_codes,
        "mean_l0": l0.mean().item(),
        "max_l0": l0.max().item(),
    }
    agreements = [
        compare("codes (sparse scattered vs dense)", rebuilt, kept, atol=atol, rtol=rtol),
        compare("codebook token embeddings", tokens, ref_tokens, atol=atol, rtol=rtol),
        compare("slots", slots, ref_slots, atol=atol, rtol=rtol),
    ]
    return agreements, stats


def run_mode(mode: str, size: ConceptSize, device: torch.device, repeats: int) -> dict[str, float]:
    s = build(mode, size, device)
    print(f"-- mode {mode}: {s.sae!r}")
    agreements, stats = check_agreement(s)  # also the warm-up of both paths
    require_agreement(agreements)
    print(f"active latents per token: mean {stats['mean_l0']:.1f}, max {stats['max_l0']:.0f}")
    memory = {
        "sparse": peak_memory_bytes(lambda: sparse_path(s), device),
        "dense": peak_memory_bytes(lambda: dense_path(s), device),
    }
    timings = interleaved_timing(
        {"sparse": lambda: sparse_path(s), "dense": lambda: dense_path(s)},
        repeats=repeats,
        warmup=0,
        device=device,
    )
    indices, values, dense_codes = stats["indices"], stats["values"], stats["dense_codes"]
    thr = s.sae.activation_threshold

    @torch.no_grad()
    def sparse_codebook():
        return s.codebook.project(indices, values, sparse=True)

    @torch.no_grad()
    def dense_codebook():
        return reference_codebook_tokens(s.codebook, dense_codes, thr)

    stage = interleaved_timing(
        {"sparse_codebook": sparse_codebook, "dense_codebook": dense_codebook},
        repeats=max(5, repeats),
        warmup=1,
        device=device,
    )
    for line in timing_lines(timings) + timing_lines(stage):
        print(line)
    print(ratio_line(timings, "dense", "sparse"))
    print(ratio_line(stage, "dense_codebook", "sparse_codebook"))
    print(
        f"peak memory: sparse {memory['sparse'] / MIB:.0f} MiB, dense {memory['dense'] / MIB:.0f} MiB"
    )
    return {
        "codebook_speedup": stage.paired_ratio("dense_codebook", "sparse_codebook"),
        "path_speedup": timings.paired_ratio("dense", "sparse"),
        "path_speedup_cpu": timings.paired_ratio("dense", "sparse", cpu=True),
        "codebook_speedup_cpu": stage.paired_ratio("dense_codebook", "sparse_codebook", cpu=True),
        "memory_ratio": memory["sparse"] / memory["dense"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=ConceptSize.seq_len)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    device = setup(args.threads, args.device)
    size = ConceptSize(seq_len=args.seq_len)
    print("== benchmark 2: concept path at paper dimensions, sparse vs dense ==")
    print(machine_summary(device))
    print(
        f"d_in {size.d_in}, d_sae {size.d_sae}, L {size.seq_len}, K {size.num_slots}, "
        f"d_q {size.codebook_dim}; forward under no_grad"
    )
    results = {mode: run_mode(mode, size, device, args.repeats) for mode in args.modes}
    for mode, r in results.items():
        print(
            f"RESULT concept[{mode}] codebook stage speedup dense/sparse = "
            f"{r['codebook_speedup']:.1f}x (cpu time {r['codebook_speedup_cpu']:.1f}x) "
            f"{verdict(r['codebook_speedup'], TARGET_CODEBOOK_SPEEDUP, higher_is_better=True)}"
        )
        print(
            f"RESULT concept[{mode}] whole path speedup dense/sparse = {r['path_speedup']:.2f}x "
            f"(cpu time {r['path_speedup_cpu']:.2f}x) "
            f"{verdict(r['path_speedup'], TARGET_PATH_SPEEDUP, higher_is_better=True)}"
        )
        print(
            f"RESULT concept[{mode}] peak memory ratio sparse/dense = {r['memory_ratio']:.3f} "
            f"{verdict(r['memory_ratio'], TARGET_MEMORY_RATIO, higher_is_better=False)}"
        )
    return results


if __name__ == "__main__":
    main()
