"""SAE pretraining: cache the VLM's hidden states at ``sae_layer``, train the SAE on them.

As in arXiv 2605.22658, the SAE is pretrained on cached LLM activations, then trained
jointly. Three steps, each usable alone:

1. :func:`cache_activations` runs ``model.vlm`` over batches with a forward hook on decoder
   layer ``config.sae_layer`` (the forward stops right after that layer), keeps the
   unpadded tokens and writes them to safetensors shards in a folder, flushing every
   ``shard_tokens`` tokens, so memory stays bounded by one shard plus one batch.
2. :class:`ActivationCache` streams the shards back in shuffled batches (a shuffle buffer
   over shards read in a seeded random order).
3. :func:`train_sae` trains a :class:`SparseAutoencoder` (topk by default; relu with a
   decoder-norm-weighted L1 penalty as SAELens' "standard" SAE) and reports L0, fraction of
   variance unexplained and the share of dead latents in a :class:`SAETrainingReport`.

:func:`pretrain_sae_for_model` chains them, saves the SAE in SAELens format and loads it
into ``model.sae`` (:func:`load_sae_into_model`).

Library side (not remote code).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..modeling_segcompass import _decoder_layers
from ..sparse_autoencoder import SparseAutoencoder
from .sae_export import save_sae_lens
from .sae_objective import SAE_RECONSTRUCTIONS, sae_pretraining_loss

logger = logging.getLogger(__name__)

CACHE_MANIFEST = "activation_cache.json"
_SHARD_TENSOR = "activations"
#: Batch keys the VLM's forward takes (other keys, e.g. SAM inputs or labels, are ignored).
_VLM_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


class _StopForward(Exception):
    """Raised by the capture hook: nothing after ``sae_layer`` needs computing."""


# ---------------------------------------------------------------------- cache
@dataclass
class ActivationCache:
    """A folder of cached hidden states: safetensors shards of (N_i, d_in) + a manifest.

    Attributes:
        directory: the folder.
        shards: shard file names, in writing order.
        shard_sizes: tokens per shard.
        d_in: width of the hidden states.
        layer: decoder layer they were captured at.
        dtype: their dtype name (e.g. "float32").
    """

    directory: str
    shards: list[str]
    shard_sizes: list[int]
    d_in: int
    layer: int
    dtype: str

    @property
    def num_tokens(self) -> int:
        """Total cached tokens."""
        return sum(self.shard_sizes)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> ActivationCache:
        """Open a folder written by :func:`cache_activations`."""
        directory = os.fspath(directory)
        path = os.path.join(directory, CACHE_MANIFEST)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{directory!r} is not an activation cache (no {CACHE_MANIFEST}); write one with "
                "cache_activations(model, batches, directory). A cache whose writing was "
                "interrupted has no manifest either: write it again."
            )
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        return cls(
            directory=directory,
            shards=list(manifest["shards"]),
            shard_sizes=[int(n) for n in manifest["shard_sizes"]],
            d_in=int(manifest["d_in"]),
            layer=int(manifest["layer"]),
            dtype=str(manifest["dtype"]),
        )

    def read_shard(self, index: int) -> torch.Tensor:
        """Shard ``index`` as a (N_i, d_in) tensor."""
        with safe_open(os.path.join(self.directory, self.shards[index]), framework="pt") as f:
            return f.get_tensor(_SHARD_TENSOR)

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        buffer_tokens: int = 65536,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[torch.Tensor]:
        """One pass over the cache in batches of (batch_size, d_in).

        Shuffling reads the shards in a random order into a buffer of at least
        ``buffer_tokens`` tokens, permutes it and emits half of it, so memory stays near
        ``buffer_tokens + one shard`` while tokens of different shards (and batches) mix.

        Args:
            batch_size: tokens per batch.
            shuffle: shuffle (seeded by ``seed``); False reads in writing order.
            buffer_tokens: size of the shuffle buffer.
            seed: seed of the shard order and the permutations.
            drop_last: drop the final batch if it is smaller than ``batch_size``.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"iter_batches: batch_size must be an int >= 1, got {batch_size!r}.")
        gen = torch.Generator().manual_seed(seed)
        if shuffle:
            order = torch.randperm(len(self.shards), generator=gen).tolist()
        else:
            order = list(range(len(self.shards)))
        threshold = max(buffer_tokens, batch_size) if shuffle else batch_size
        buffer = torch.empty(0, self.d_in)
        for index in order:
            buffer = torch.cat([buffer, self.read_shard(index).float()])  # (N, d_in)
            if buffer.shape[0] < threshold:
                continue
            if shuffle:
                buffer = buffer[torch.randperm(buffer.shape[0], generator=gen)]
            # keep half of a shuffled buffer to mix with the next shard
            ready = buffer.shape[0] - (buffer.shape[0] // 2 if shuffle else 0)
            ready -= ready % batch_size
            yield from buffer[:ready].split(batch_size)
            buffer = buffer[ready:]
        if shuffle and buffer.shape[0]:
            buffer = buffer[torch.randperm(buffer.shape[0], generator=gen)]
        for batch in buffer.split(batch_size):
            if batch.shape[0] == batch_size or not drop_last:
                yield batch


class _ShardWriter:
    """Buffers (n, d_in) rows and writes shards of exactly ``shard_tokens`` rows (last: fewer)."""

    def __init__(self, directory: str, shard_tokens: int, dtype: torch.dtype) -> None:
        self.directory = directory
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.pending: list[torch.Tensor] = []
        self.pending_rows = 0
        self.shards: list[str] = []
        self.sizes: list[int] = []

    def add(self, rows: torch.Tensor) -> None:
        self.pending.append(rows.detach().to("cpu", self.dtype))
        self.pending_rows += rows.shape[0]
        while self.pending_rows >= self.shard_tokens:
            stacked = torch.cat(self.pending)  # (pending_rows, d_in)
            self._write(stacked[: self.shard_tokens])
            rest = stacked[self.shard_tokens :]
            self.pending, self.pending_rows = [rest], rest.shape[0]

    def close(self) -> None:
        if self.pending_rows:
            self._write(torch.cat(self.pending))
        self.pending, self.pending_rows = [], 0

    def _write(self, rows: torch.Tensor) -> None:
        name = f"shard_{len(self.shards):05d}.safetensors"
        save_file({_SHARD_TENSOR: rows.contiguous()}, os.path.join(self.directory, name))
        self.shards.append(name)
        self.sizes.append(int(rows.shape[0]))


@torch.no_grad()
def cache_activations(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    directory: str | os.PathLike,
    *,
    layer: int | None = None,
    shard_tokens: int = 65536,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> ActivationCache:
    """Run ``model.vlm`` over ``batches`` and cache the hidden states at decoder ``layer``.

    Args:
        model: a `SegCompassForReasoningSegmentation` (only ``model.vlm`` runs).
        batches: dicts with ``input_ids`` (B, L), ``attention_mask`` (B, L) and the VLM's
            image inputs (``pixel_values``, ``image_grid_thw``), e.g. from the processor or
            `SegCompassCollator`; other keys are ignored.
        directory: output folder (created; must not already hold a cache).
        layer: decoder layer whose output is cached (default ``model.config.sae_layer``, the
            layer the SAE reads in the forward).
        shard_tokens: tokens per shard file; bounds the memory of the writer.
        max_tokens: stop after this many tokens (None: all batches).
        dtype: storage dtype.
        progress: show a tqdm bar.

    Returns:
        The :class:`ActivationCache`. Only tokens with ``attention_mask == 1`` are kept (no
        padding). The manifest is written last, so an interrupted run leaves no valid cache.
    """
    directory = os.fspath(directory)
    if os.path.exists(os.path.join(directory, CACHE_MANIFEST)):
        raise FileExistsError(
            f"{directory!r} already holds an activation cache; open it with "
            "ActivationCache.open(directory) or choose another folder."
        )
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be an int >= 1, got {shard_tokens!r}.")
    vlm = getattr(model, "vlm", None)
    if vlm is None:
        raise TypeError(
            f"cache_activations expects a SegCompassForReasoningSegmentation, got "
            f"{type(model).__name__}."
        )
    layers = _decoder_layers(vlm)
    layer = model.config.sae_layer if layer is None else layer
    if not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(
            f"layer must be a decoder layer index in [0, {len(layers)}), got {layer!r}."
        )
    os.makedirs(directory, exist_ok=True)
    writer = _ShardWriter(directory, shard_tokens, dtype)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured["hidden"] = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    device = next(vlm.parameters()).device
    was_training = vlm.training
    vlm.eval()
    handle = layers[layer].register_forward_hook(hook)
    total = 0
    bar = tqdm(total=max_tokens, desc="caching activations", unit="tok", disable=not progress)
    try:
        for batch in batches:
            missing = [k for k in ("input_ids", "attention_mask") if k not in batch]
            if missing:
                raise KeyError(
                    f"cache_activations: a batch lacks {missing}; expected the processor's "
                    f"output (keys {list(_VLM_KEYS)}), got keys {sorted(batch)}."
                )
            inputs = {
                k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()
                if k in _VLM_KEYS and v is not None
            }
            try:
                vlm.model(**inputs, use_cache=False)
            except _StopForward:
                pass
            if "hidden" not in captured:
                raise RuntimeError(
                    f"cache_activations: decoder layer {layer} never ran; does this VLM's "
                    "`.model` forward go through `_decoder_layers(vlm)`?"
                )
            hidden = captured.pop("hidden")  # (B, L, d_in)
            rows = hidden[inputs["attention_mask"].bool()]  # (tokens, d_in): padding dropped
            if max_tokens is not None:
                rows = rows[: max(0, max_tokens - total)]
            writer.add(rows)
            total += rows.shape[0]
            bar.update(rows.shape[0])
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        handle.remove()
        bar.close()
        vlm.train(was_training)
    writer.close()
    if total == 0:
        raise ValueError("cache_activations: the batches held no token (all padding or empty).")
    d_in = _width(writer)
    manifest = {
        "shards": writer.shards,
        "shard_sizes": writer.sizes,
        "d_in": d_in,
        "layer": layer,
        "dtype": str(dtype).replace("torch.", ""),
        "num_tokens": total,
    }
    tmp = os.path.join(directory, CACHE_MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(directory, CACHE_MANIFEST))
    logger.info(
        "Cached %d tokens of layer %d in %d shard(s) at %s",
        total,
        layer,
        len(writer.shards),
        directory,
    )
    return ActivationCache.open(directory)


def _width(writer: _ShardWriter) -> int:
    with safe_open(os.path.join(writer.directory, writer.shards[0]), framework="pt") as f:
        return int(f.get_slice(_SHARD_TENSOR).get_shape()[1])


# ---------------------------------------------------------------------- training
@dataclass
class SAETrainingReport:
    """What :func:`train_sae` measured.

    Attributes:
        steps: optimizer steps taken.
        tokens_seen: training tokens processed.
        l0: mean active latents per token on the evaluation tokens after training.
        fvu: fraction of variance unexplained on the evaluation tokens after training
            (0 = perfect, 1 = no better than the mean).
        initial_fvu: the same before training.
        dead_fraction: share of latents not active on any of the last ``dead_window_tokens``
            training tokens (all tokens seen, if fewer).
        final_loss: training loss of the last step.
        losses: training loss of every step.
    """

    steps: int
    tokens_seen: int
    l0: float
    fvu: float
    initial_fvu: float
    dead_fraction: float
    final_loss: float
    losses: list[float] = field(default_factory=list)


def _as_batches(
    activations: ActivationCache | torch.Tensor, batch_size: int, seed: int, shuffle: bool
) -> Iterator[torch.Tensor]:
    if isinstance(activations, ActivationCache):
        return activations.iter_batches(batch_size, shuffle=shuffle, seed=seed)
    rows = activations.reshape(-1, activations.shape[-1])  # (N, d_in)
    if shuffle:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))]
    return iter(rows.split(batch_size))


@torch.no_grad()
def evaluate_sae(
    sae: SparseAutoencoder,
    activations: ActivationCache | torch.Tensor,
    *,
    max_tokens: int | None = None,
    batch_size: int = 4096,
) -> tuple[float, float]:
    """(fvu, l0) of ``sae`` over (the first ``max_tokens`` of) ``activations``, streaming.

    FVU is ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over all evaluated tokens (the
    mean taken over them too), accumulated in float64 so that it needs one pass.
    """
    device = sae.W_enc.device
    residual = torch.zeros((), dtype=torch.float64)
    sum_x = None
    sum_sq = torch.zeros((), dtype=torch.float64)
    active = torch.zeros((), dtype=torch.float64)
    count = 0
    for batch in _as_batches(activations, batch_size, seed=0, shuffle=False):
        if max_tokens is not None:
            batch = batch[: max_tokens - count]
        if batch.shape[0] == 0:
            break
        x = batch.to(device, sae.W_enc.dtype)
        codes = sae.encode(x)
        recon = sae.decode(codes)
        residual += (recon - x).double().pow(2).sum().cpu()
        xd = x.double().cpu()
        sum_x = xd.sum(0) if sum_x is None else sum_x + xd.sum(0)
        sum_sq += xd.pow(2).sum()
        active += (codes.values != 0).sum().double().cpu()
        count += x.shape[0]
        if max_tokens is not None and count >= max_tokens:
            break
    if count == 0:
        raise ValueError("evaluate_sae: no activation to evaluate.")
    total = sum_sq - sum_x.pow(2).sum() / count  # sum ||x - mean||^2
    fvu = float(residual / total.clamp_min(1e-12))
    return fvu, float(active / count)


def train_sae(
    sae: SparseAutoencoder,
    activations: ActivationCache | torch.Tensor,
    *,
    steps: int,
    batch_size: int = 4096,
    lr: float = 1e-3,
    l1_coefficient: float = 1.0,
    reconstruction: str = "mean",
    dead_window_tokens: int = 1_000_000,
    init_b_dec: str = "mean",
    eval_tokens: int = 65536,
    grad_clip: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> SAETrainingReport:
    """Train ``sae`` in place on cached activations (Adam, reconstruction MSE + sparsity).

    Loss per batch: ``mean over tokens of ||x - x_hat||^2 / d_in`` (MSE), plus for relu and
    jumprelu SAEs ``l1_coefficient * mean over tokens of sum_i a_i * ||W_dec_i||`` (SAELens'
    "standard" L1 penalty, weighted by the decoder norms so that shrinking codes while
    growing the decoder does not pay). Topk SAEs get their sparsity from k (no penalty).
    The jumprelu threshold learns through the reconstruction's pseudo-gradient
    (`SparseAutoencoder.encode_dense`); SAELens' L0 penalty for jumprelu is not implemented.

    Args:
        sae: the SAE (its device and dtype are used); ``activation_threshold`` and
            ``max_active`` should be off while pretraining (see
            :func:`pretrain_sae_for_model`).
        activations: an :class:`ActivationCache` (streamed, reshuffled every pass) or a tensor
            (..., d_in).
        steps: optimizer steps; the data is cycled as often as needed.
        batch_size: tokens per step.
        lr: Adam learning rate.
        l1_coefficient: weight of the L1 penalty (relu / jumprelu only).
        reconstruction: "mean" (the MSE above) or "sum" (upstream: the squared error summed
            over features; with ``l1_coefficient=5``, see :mod:`.sae_objective`).
        dead_window_tokens: a latent is dead when it fired on none of the last this-many
            training tokens.
        init_b_dec: "mean" sets ``b_dec`` to the mean of the evaluation tokens first (SAELens'
            ``b_dec_init_method="mean"``); "none" keeps it.
        eval_tokens: tokens (the first ones of the cache) for the before/after FVU and L0.
        grad_clip: max gradient norm (0 disables clipping).
        seed: seed of the data order.
        progress: show a tqdm bar.
    """
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"train_sae expects a SparseAutoencoder, got {type(sae).__name__}.")
    width = activations.d_in if isinstance(activations, ActivationCache) else activations.shape[-1]
    if width != sae.d_in:
        raise ValueError(
            f"train_sae: the activations have width {width}, the SAE expects d_in={sae.d_in}; "
            "cache the layer of the model the SAE belongs to or build the SAE with "
            f"d_in={width}."
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train_sae: steps must be an int >= 1, got {steps!r}.")
    if l1_coefficient < 0 or not math.isfinite(l1_coefficient):
        raise ValueError(f"train_sae: l1_coefficient must be >= 0, got {l1_coefficient!r}.")
    if reconstruction not in SAE_RECONSTRUCTIONS:
        raise ValueError(f"train_sae: reconstruction must be one of {SAE_RECONSTRUCTIONS}.")
    if init_b_dec not in ("mean", "none"):
        raise ValueError(f"train_sae: init_b_dec must be 'mean' or 'none', got {init_b_dec!r}.")
    device, dtype = sae.W_enc.device, sae.W_enc.dtype

    if init_b_dec == "mean":
        with torch.no_grad():
            total, count = None, 0
            for batch in _as_batches(activations, 4096, seed=0, shuffle=False):
                batch = batch[: eval_tokens - count].double()
                total = batch.sum(0) if total is None else total + batch.sum(0)
                count += batch.shape[0]
                if count >= eval_tokens:
                    break
            sae.b_dec.copy_((total / max(count, 1)).to(device, dtype))
    initial_fvu, _ = evaluate_sae(sae, activations, max_tokens=eval_tokens)

    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    penalised = sae.architecture in ("relu", "jumprelu") and l1_coefficient > 0
    tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long)
    tokens_seen, losses, epoch = 0, [], 0
    sae.train()
    batches = _as_batches(activations, batch_size, seed=seed, shuffle=True)
    bar = tqdm(range(steps), desc="training SAE", unit="step", disable=not progress)
    for _step in bar:
        batch = next(batches, None)
        if batch is None:  # one pass done: reshuffle with a new seed
            epoch += 1
            batches = _as_batches(activations, batch_size, seed=seed + epoch, shuffle=True)
            batch = next(batches)
        x = batch.to(device, dtype)  # (N, d_in)
        acts = sae.encode_dense(x)  # (N, d_sae)
        recon = sae.decode(acts)  # (N, d_in)
        l1 = l1_coefficient if penalised else 0.0
        loss = sae_pretraining_loss(
            x, acts, recon, sae.W_dec, l1_coefficient=l1, reconstruction=reconstruction
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
        optimizer.step()
        with torch.no_grad():
            fired = (acts != 0).any(0).cpu()
            tokens_since_fired += x.shape[0]
            tokens_since_fired[fired] = 0
        tokens_seen += x.shape[0]
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
    bar.close()
    sae.eval()
    fvu, l0_value = evaluate_sae(sae, activations, max_tokens=eval_tokens)
    dead = tokens_since_fired >= min(dead_window_tokens, tokens_seen)
    report = SAETrainingReport(
        steps=steps,
        tokens_seen=tokens_seen,
        l0=l0_value,
        fvu=fvu,
        initial_fvu=initial_fvu,
        dead_fraction=float(dead.float().mean()),
        final_loss=losses[-1],
        losses=losses,
    )
    logger.info(
        "SAE trained %d steps: FVU %.4f (from %.4f), L0 %.2f, dead %.1f%%",
        steps,
        fvu,
        initial_fvu,
        l0_value,
        100 * report.dead_fraction,
    )
    return report


# ---------------------------------------------------------------------- model glue
def load_sae_into_model(model: nn.Module, folder: str | os.PathLike) -> SparseAutoencoder:
    """Load a SAELens-format SAE folder into ``model.sae`` (exact weights).

    The SAE must read the model's layer width (``d_in == config.llm_hidden_size``) and have
    ``d_sae == config.d_sae`` (the codebook's input width). Its architecture, k and
    ``apply_b_dec_to_input`` are written into the config (so that ``save_pretrained`` /
    ``from_pretrained`` rebuild the same SAE); the model's encoding options
    (``activation_threshold``, ``sae_max_active``) are kept.

    Returns:
        The loaded SAE, now ``model.sae``.
    """
    config = model.config
    folder = os.fspath(folder)
    sae = SparseAutoencoder.load(
        folder,
        activation_threshold=config.activation_threshold,
        max_active=config.sae_max_active,
    )
    if sae.d_in != config.llm_hidden_size:
        raise ValueError(
            f"The SAE in {folder!r} reads width d_in={sae.d_in}, but the model's language model "
            f"has hidden size {config.llm_hidden_size}; it was trained on another model. "
            "Pretrain one on this model with pretrain_sae_for_model(model, batches)."
        )
    if sae.d_sae != config.d_sae:
        raise ValueError(
            f"The SAE in {folder!r} has d_sae={sae.d_sae}, but the model's codebook expects "
            f"config.d_sae={config.d_sae}; build the model with d_sae={sae.d_sae} or train an "
            f"SAE with {config.d_sae} latents."
        )
    reference = model.sae.W_enc
    sae = sae.to(device=reference.device, dtype=reference.dtype)
    sae.requires_grad_(reference.requires_grad)
    config.sae_architecture = sae.architecture
    if sae.architecture == "topk":
        config.sae_k = sae.k
    config.sae_apply_b_dec_to_input = sae.apply_b_dec_to_input
    model.sae = sae
    logger.info(
        "Loaded the SAE of %s into the model (%s, d_sae=%d).", folder, sae.architecture, sae.d_sae
    )
    return sae


@dataclass
class SAEPretrainingResult:
    """What :func:`pretrain_sae_for_model` returns.

    Attributes:
        report: the :class:`SAETrainingReport`.
        sae_path: the SAELens-format folder the SAE was saved to.
        cache: the :class:`ActivationCache` used.
    """

    report: SAETrainingReport
    sae_path: str
    cache: ActivationCache


def pretrain_sae_for_model(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    sae: SparseAutoencoder | None = None,
    steps: int = 1000,
    batch_size: int = 4096,
    lr: float = 1e-3,
    l1_coefficient: float = 1.0,
    reconstruction: str = "mean",
    shard_tokens: int = 65536,
    max_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SAEPretrainingResult:
    """Cache ``model``'s activations at ``config.sae_layer``, train an SAE, save it, load it.

    Args:
        model: a `SegCompassForReasoningSegmentation`.
        batches: VLM input batches (see :func:`cache_activations`).
        output_dir: where the SAE is saved in SAELens format (``cfg.json`` +
            ``sae_weights.safetensors``).
        cache_dir: activation cache folder (default: a temporary folder, deleted after).
        sae: the SAE to train (default: a fresh one with the config's architecture, d_sae, k
            and no activation threshold: the threshold applies to the codebook input, not to
            SAE training).
        steps, batch_size, lr, l1_coefficient, reconstruction, seed: see :func:`train_sae`.
        shard_tokens, max_tokens: see :func:`cache_activations`.
        progress: show progress bars.
    """
    config = model.config
    if sae is None:
        sae = SparseAutoencoder(
            d_in=config.llm_hidden_size,
            d_sae=config.d_sae,
            architecture=config.sae_architecture,
            k=config.sae_k,
            apply_b_dec_to_input=config.sae_apply_b_dec_to_input,
            jumprelu_init_threshold=config.sae_jumprelu_init_threshold,
        ).to(model.sae.W_enc.device)
    temporary = None
    if cache_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="segcompass-activations-")
        cache_dir = temporary.name
    try:
        cache = cache_activations(
            model,
            batches,
            cache_dir,
            shard_tokens=shard_tokens,
            max_tokens=max_tokens,
            progress=progress,
        )
        if cache.d_in != sae.d_in:
            raise ValueError(
                f"pretrain_sae_for_model: the model's layer {cache.layer} has width "
                f"{cache.d_in} but the SAE expects d_in={sae.d_in}."
            )
        report = train_sae(
            sae,
            cache,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            l1_coefficient=l1_coefficient,
            reconstruction=reconstruction,
            seed=seed,
            progress=progress,
        )
        output_dir = os.fspath(output_dir)
        save_sae_lens(sae, output_dir, layer=cache.layer)
        load_sae_into_model(model, output_dir)
    finally:
        if temporary is not None:
            temporary.cleanup()
    return SAEPretrainingResult(report=report, sae_path=output_dir, cache=cache)


__all__ = [
    "CACHE_MANIFEST",
    "ActivationCache",
    "SAEPretrainingResult",
    "SAETrainingReport",
    "cache_activations",
    "evaluate_sae",
    "load_sae_into_model",
    "pretrain_sae_for_model",
    "train_sae",
]
