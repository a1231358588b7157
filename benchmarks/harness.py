"""Measurement harness shared by the benchmarks: machine summary, interleaved timing, peak memory.

Method (docs/performance.md explains it in full):

- Timing: the variants of one comparison are run alternately in the same process
  (A B, then B A, ...) after warm-up runs. Reported: the median of each variant and the
  median over rounds of the per-round ratio (the two runs of a round are adjacent in time,
  so load from other processes hits both alike). Wall clock and process CPU time are both
  recorded; on a shared machine the CPU time is the steadier measure of the work done.
- Timing on CUDA: CUDA events around each call (`time_call`), the device synchronised first.
- Peak memory: on CUDA, `torch.cuda.max_memory_allocated` above the level at the start of
  the call. On CPU there is no allocator peak counter, so the call is run once under
  `torch.profiler.profile(profile_memory=True)` and the allocator events (+bytes on
  allocation, -bytes on free) are summed in time order; the peak of that running sum is the
  largest amount of tensor memory the call held at once beyond what existed before it.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from modeling_segcompass.training.allocator import freed_memory_kept, keep_freed_memory

MIB = 1024 * 1024


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux), or what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary(device: torch.device) -> str:
    """One line naming the hardware and software a result was measured on."""
    parts = [
        f"cpu={cpu_model()!r}",
        f"cores={os.cpu_count()}",
        f"torch_threads={torch.get_num_threads()}",
        f"torch={torch.__version__}",
        f"python={platform.python_version()}",
        f"device={device}",
        f"malloc={'keeps-freed' if freed_memory_kept() else 'default'}",
    ]
    if device.type == "cuda":
        parts.append(f"gpu={torch.cuda.get_device_name(device)!r}")
    try:
        load = os.getloadavg()
        parts.append(f"loadavg={load[0]:.2f}")
    except OSError:
        pass
    return "machine: " + " ".join(parts)


def setup(threads: int | None, device_name: str) -> torch.device:
    """Fix the intra-op thread count (printed with the machine), keep freed memory in the
    process as `segcompass` does (`keep_freed_memory`; printed as malloc=...; every variant
    runs under the same allocator) and pick the device."""
    keep_freed_memory()
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device_name} was requested but CUDA is not available; use --device cpu."
        )
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds of every timed repeat, per variant name, in round order.

    `seconds` is wall-clock time; `cpu_seconds` is the CPU time of this process over the same
    call (all its threads). On a machine shared with other jobs the wall clock stretches with
    their load while the CPU time mostly does not, so both ratios are reported.
    """

    seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)

    def _table(self, cpu: bool) -> dict[str, list[float]]:
        return self.cpu_seconds if cpu else self.seconds

    def median(self, name: str, *, cpu: bool = False) -> float:
        return statistics.median(self._table(cpu)[name])

    def ratio(self, numerator: str, denominator: str, *, cpu: bool = False) -> float:
        """median(numerator) / median(denominator)."""
        return self.median(numerator, cpu=cpu) / self.median(denominator, cpu=cpu)

    def paired_ratio(self, numerator: str, denominator: str, *, cpu: bool = False) -> float:
        """Median over rounds of numerator[r] / denominator[r].

        The two runs of one round are adjacent in time, so each round's ratio sees nearly
        the same machine load; its median is the figure reported (robust to load bursts
        that hit a whole round, which the ratio of medians is not).
        """
        table = self._table(cpu)
        pairs = zip(table[numerator], table[denominator], strict=True)
        return statistics.median(a / b for a, b in pairs)

    def paired_ratio_interval(
        self, numerator: str, denominator: str, *, cpu: bool = False, confidence: float = 0.95
    ) -> tuple[float, float, float]:
        """(geometric mean, low, high) of the per-round ratios numerator[r] / denominator[r]
        with a `confidence` Student-t interval on their logarithm (rounds are independent
        paired samples; the log makes the interval of a ratio symmetric in both directions).
        With one round the interval is (ratio, ratio)."""
        from scipy import stats

        table = self._table(cpu)
        logs = [math.log(a / b) for a, b in zip(table[numerator], table[denominator], strict=True)]
        mean = statistics.fmean(logs)
        if len(logs) < 2:
            return math.exp(mean), math.exp(mean), math.exp(mean)
        half = stats.t.ppf(0.5 + confidence / 2, len(logs) - 1) * statistics.stdev(logs)
        half /= math.sqrt(len(logs))
        return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def interleaved_timing(
    variants: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> Timings:
    """Time each variant `repeats` times, alternating their order every round.

    Round r runs the variants in the given order when r is even and reversed when r is odd,
    so that neither variant always runs first (cache state, thermal and load drift cancel).
    `warmup` untimed rounds come first.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0; got {repeats} and {warmup}.")
    names = list(variants)
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    for _ in range(warmup):
        for name in names:
            variants[name]()
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            seconds, cpu_seconds = time_call(variants[name], device)
            timings.seconds[name].append(seconds)
            timings.cpu_seconds[name].append(cpu_seconds)
    return timings


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(seconds, process CPU seconds) of one call of `fn`.

    On CUDA the seconds are those of CUDA events recorded on the current stream before and
    after the call (the GPU's time for the queued work, host launch gaps included), after
    synchronising; on other devices the wall clock (`time.perf_counter`).
    """
    synchronize(device)
    cpu_start = time.process_time()
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3, time.process_time() - cpu_start
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu_start


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Largest tensor memory held at once by `fn()` beyond what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: allocator events recorded by
    `torch.profiler` (see the module docstring). The result of `fn` is dropped inside the
    measurement, as it is in the timing loop.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


@dataclass
class Agreement:
    """How closely two tensors agree: the largest absolute difference and the scale."""

    name: str
    max_abs_diff: float
    reference_max_abs: float
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol + self.rtol * self.reference_max_abs

    def line(self) -> str:
        status = "ok" if self.ok else "FAILED"
        return (
            f"agreement {self.name}: max|diff|={self.max_abs_diff:.3e} "
            f"(max|ref|={self.reference_max_abs:.3e}, atol={self.atol:g}, rtol={self.rtol:g}) "
            f"{status}"
        )


def compare(
    name: str, fast: torch.Tensor, reference: torch.Tensor, *, atol: float, rtol: float
) -> Agreement:
    """Agreement of `fast` with `reference` under max|diff| <= atol + rtol * max|reference|.

    The tolerance is relative to the reference's largest magnitude (not elementwise), since
    summation-order differences scale with the size of the summands, not of each output.
    """
    if fast.shape != reference.shape:
        raise AssertionError(
            f"{name}: the two paths disagree in shape: {tuple(fast.shape)} vs "
            f"{tuple(reference.shape)}."
        )
    a, b = fast.detach().double().cpu(), reference.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AssertionError(f"{name}: non-finite values in one of the paths.")
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return Agreement(name, diff, scale, atol, rtol)


def require_agreement(agreements: list[Agreement]) -> None:
    """Print every agreement line and raise AssertionError if any failed (before timing)."""
    for agreement in agreements:
        print(agreement.line(), flush=True)
    failed = [a.name for a in agreements if not a.ok]
    if failed:
        raise AssertionError(
            f"outputs of the two paths disagree for {failed}; timings would compare different "
            "computations, so the benchmark stops here."
        )


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def timing_lines(timings: Timings) -> list[str]:
    """One line per variant: median and every repeat (in round order)."""
    lines = []
    for name, values in timings.seconds.items():
        each = ", ".join(format_seconds(v) for v in values)
        cpu = format_seconds(timings.median(name, cpu=True))
        lines.append(
            f"time {name}: median {format_seconds(timings.median(name))} [{each}]; "
            f"cpu time median {cpu}"
        )
    return lines


def ratio_line(timings: Timings, numerator: str, denominator: str) -> str:
    """Both ratio estimates, paired (reported) and of medians (for reference)."""
    return (
        f"ratio {numerator}/{denominator}: wall clock paired median "
        f"{timings.paired_ratio(numerator, denominator):.3f} (ratio of medians "
        f"{timings.ratio(numerator, denominator):.3f}); cpu time paired median "
        f"{timings.paired_ratio(numerator, denominator, cpu=True):.3f}"
    )


def verdict(value: float, target: float, *, higher_is_better: bool) -> str:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"(target {sign} {target:g}: {'met' if met else 'MISSED'})"
