"""The sparse autoencoder (SAE) that turns LLM hidden states into sparse concepts.

SegCompass (paper, data flow step 2) encodes the hidden states of every token at one middle
layer of the multimodal LLM with an SAE; the active latents are the "concepts" the query
codebook gathers. This module implements the three SAE families the package supports
(relu, the "standard" SAE of SAELens; topk; jumprelu), with parameters named and laid out
exactly as in SAELens (``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae), ``W_dec`` (d_sae, d_in),
``b_dec`` (d_in), jumprelu adds ``threshold`` (d_sae)) and reads and writes the SAELens
folder format (``cfg.json`` + ``sae_weights.safetensors``) without depending on sae-lens.

Codes are returned sparse, as :class:`SparseCodes` ``(indices, values)`` of shape (..., n),
so that a (B, L, 65536) dense code is never built on the model's hot path: the encoder
works on row chunks of at most ``chunk_size`` positions, so the transient dense
pre-activation buffer is (chunk_size, d_sae), never (B * L, d_sae).

This is a remote-code file: it imports only the standard library, torch and safetensors.
"""

from __future__ import annotations

import logging
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .sae_lens_format import (
    _FROM_SAELENS_ARCHITECTURE,
)
from .sae_lens_format import load_sae as _load_sae
from .sae_lens_format import save_sae as _save_sae
from .sae_lens_format import to_sae_lens_config as _to_sae_lens_config

logger = logging.getLogger(__name__)

ARCHITECTURES = ("relu", "topk", "jumprelu")


class SparseCodes(NamedTuple):
    """Sparse SAE codes: for every position, the n latents kept and their activations.

    A slot is active iff its value is non-zero; inactive (padding) slots hold value 0 and
    index 0. Within a position the values are sorted in decreasing order.

    Attributes:
        indices: LongTensor (..., n), latent ids in [0, d_sae).
        values: Tensor (..., n), the activations (same dtype as the SAE parameters).
    """

    indices: torch.Tensor
    values: torch.Tensor


class SparseAutoencoderOutput(NamedTuple):
    """Output of :meth:`SparseAutoencoder.forward`.

    Attributes:
        reconstruction: Tensor (..., d_in), ``decode(encode(x))``.
        codes: :class:`SparseCodes` with indices and values of shape (..., n).
        fvu: scalar Tensor, the fraction of variance unexplained of the reconstruction
            over all positions of the batch (see :func:`fraction_of_variance_unexplained`).
    """

    reconstruction: torch.Tensor
    codes: SparseCodes
    fvu: torch.Tensor


class _JumpReLUWithThresholdGradient(torch.autograd.Function):
    """JumpReLU ``pre * (pre > threshold)`` with the pseudo-gradient for the threshold.

    The gradient for ``pre`` is the plain one (``pre > threshold``); the threshold gets the
    straight-through estimate of Rajamanoharan et al. 2024 (JumpReLU SAEs, eq. 11), with a
    rectangle kernel of width ``bandwidth``, as SAELens' JumpReLU training SAE does.
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad_pre = grad_output * (pre > threshold).to(grad_output.dtype)
        in_window = ((pre - threshold).abs() < bandwidth / 2).to(grad_output.dtype)
        grad_threshold = -(threshold / bandwidth) * in_window * grad_output
        grad_threshold = grad_threshold.reshape(-1, threshold.shape[-1]).sum(0)  # (d_sae,)
        return grad_pre, grad_threshold, None


class _PickedPreActivations(torch.autograd.Function):
    """Entries (C, n) of the pre-activations ``sae_in @ W_enc + b_enc`` at (row, `indices`),
    given their precomputed values; backward is that of the dense product then indexing
    (a (C, d_sae) gradient with the entries' gradients at their places, then the product's
    backward), so gradients are those autograd gives for `SparseAutoencoder.encode`."""

    @staticmethod
    def forward(ctx, sae_in, w_enc, b_enc, picked, indices):  # noqa: ARG004
        ctx.save_for_backward(sae_in, w_enc, indices)
        return picked.clone()

    @staticmethod
    def backward(ctx, grad):
        sae_in, w_enc, indices = ctx.saved_tensors
        rows = torch.arange(indices.shape[0], device=indices.device)[:, None]
        dense = grad.new_zeros(sae_in.shape[0], w_enc.shape[1])
        dense.index_put_((rows.expand_as(indices), indices), grad, accumulate=True)
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        grad_in = dense @ w_enc.t() if need_in else None
        grad_w = sae_in.t() @ dense if need_w else None
        grad_b = dense.sum(0) if need_b else None
        return grad_in, grad_w, grad_b, None, None


def _pack_positive(
    scores: torch.Tensor, max_active: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries > 0 of each row of ``scores`` (C, d_sae), largest first.

    Returns (indices (C, n), values (C, n)) with n = max(1, largest count in a row), capped
    at ``max_active`` (then the largest entries are kept); padding slots of rows with fewer
    entries hold value 0 (their index is meaningless). Same entries and order as
    ``scores.topk(n)`` (up to exact ties), from one pass over the buffer plus an (nnz,)-sized
    pack and a sort of (C, n), instead of a selection over all d_sae columns per row.
    """
    num_rows = scores.shape[0]
    rows, cols = (scores > 0).nonzero(as_tuple=True)  # row-major: (nnz,) each
    counts = torch.bincount(rows, minlength=num_rows)  # (C,)
    n = max(1, int(counts.max())) if num_rows else 1
    if max_active is not None and n > max_active:
        top = scores.topk(max_active, dim=-1)  # (C, max_active)
        return top.indices, top.values
    starts = counts.cumsum(0) - counts
    slot = torch.arange(rows.shape[0], device=scores.device) - starts[rows]
    values = scores.new_zeros(num_rows, n)
    indices = torch.zeros(num_rows, n, dtype=torch.long, device=scores.device)
    values[rows, slot] = scores[rows, cols]
    indices[rows, slot] = cols
    values, order = values.sort(dim=-1, descending=True, stable=True)  # (C, n)
    return indices.gather(-1, order), values


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def _check_non_negative_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    return float(value)


class SparseAutoencoder(nn.Module):
    """Sparse autoencoder over LLM hidden states, in SAELens layout.

    Encoding (SAELens formula)::

        pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc          # (..., d_sae)
        relu:     a = relu(pre)
        topk:     a = relu(pre) on the k largest pre-activations, 0 elsewhere
        jumprelu: a = pre * (pre > relu(threshold))   (= SAELens' relu(pre) * mask)

    then ``activation_threshold`` zeroes every activation with ``|a| < activation_threshold``
    (upstream SegCompass applies 2.0 to relu codes before the codebook) and, for relu and
    jumprelu, ``max_active`` keeps only the largest activations of each position.
    Decoding: ``a @ W_dec + b_dec``.

    Gradients: :meth:`encode` passes gradients to ``W_enc``, ``b_enc`` and ``b_dec`` through
    the kept activations; the jumprelu ``threshold`` gets no gradient there (it acts as a
    constant, which is what joint SegCompass training needs). :meth:`encode_dense` gives the
    same numbers and, for jumprelu, the JumpReLU pseudo-gradient for ``threshold``
    (rectangle kernel, width ``jumprelu_bandwidth``), for SAE pretraining.

    Args:
        d_in: width of the hidden states (the LLM hidden size).
        d_sae: number of latents (concepts), 65536 in the paper.
        architecture: one of "relu" (SAELens "standard" is accepted as an alias), "topk",
            "jumprelu".
        k: latents kept per position by the topk architecture, 1 <= k <= d_sae.
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding (SAELens).
        jumprelu_init_threshold: initial value of every jumprelu threshold.
        activation_threshold: activations with ``|a| < activation_threshold`` are zeroed,
            for every architecture; 0 disables it.
        max_active: if set, at most this many latents per position are kept (the largest);
            for topk the effective k is ``min(k, max_active)``.
        chunk_size: positions encoded at once; bounds the transient (chunk_size, d_sae)
            pre-activation buffer (512 rows: 128 MiB at d_sae 65536 in float32). Smaller
            chunks hold less but run the encoder GEMM slower: at d_in 3584, d_sae 65536 on
            2 CPU cores, 128 / 256 / 512 rows took 4.9 / 3.9 / 3.4 s of CPU for 512 tokens.
    """

    def __init__(
        self,
        *,
        d_in: int,
        d_sae: int,
        architecture: str = "topk",
        k: int = 32,
        apply_b_dec_to_input: bool = True,
        jumprelu_init_threshold: float = 0.001,
        activation_threshold: float = 0.0,
        max_active: int | None = None,
        chunk_size: int = 512,
    ) -> None:
        super().__init__()
        self.d_in = _check_positive_int("d_in", d_in)
        self.d_sae = _check_positive_int("d_sae", d_sae)
        if architecture not in _FROM_SAELENS_ARCHITECTURE:
            raise ValueError(
                f"Unknown SAE architecture {architecture!r}; expected one of "
                f"{sorted(ARCHITECTURES)} (SAELens' 'standard' is accepted for 'relu')."
            )
        self.architecture = _FROM_SAELENS_ARCHITECTURE[architecture]
        self.k = _check_positive_int("k", k)
        if self.architecture == "topk" and k > d_sae:
            raise ValueError(
                f"`k` must be between 1 and d_sae={d_sae} for a topk SAE, got k={k}; "
                "lower k or raise d_sae."
            )
        if not isinstance(apply_b_dec_to_input, bool):
            raise ValueError(
                f"`apply_b_dec_to_input` must be a bool, got {apply_b_dec_to_input!r}."
            )
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.jumprelu_init_threshold = _check_non_negative_float(
            "jumprelu_init_threshold", jumprelu_init_threshold
        )
        self.activation_threshold = _check_non_negative_float(
            "activation_threshold", activation_threshold
        )
        if max_active is not None:
            _check_positive_int("max_active", max_active)
            if max_active > d_sae:
                raise ValueError(
                    f"`max_active` must be between 1 and d_sae={d_sae} (or None), got {max_active}."
                )
        self.max_active = max_active
        self.chunk_size = _check_positive_int("chunk_size", chunk_size)
        # Width of the rectangle kernel of the jumprelu threshold pseudo-gradient (SAELens
        # default 0.05); only used by encode_dense.
        self.jumprelu_bandwidth = 0.05
        # Free-form SAELens metadata (hook_name, model_name, ...) kept across load/save.
        self.sae_metadata: dict = {}

        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.empty(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.empty(d_in))
        if self.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.empty(d_sae))
        self.reset_parameters()

    def extra_repr(self) -> str:
        extra = f", k={self.k}" if self.architecture == "topk" else ""
        return (
            f"d_in={self.d_in}, d_sae={self.d_sae}, architecture={self.architecture!r}{extra}, "
            f"activation_threshold={self.activation_threshold}, max_active={self.max_active}"
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise: W_dec rows of unit norm, ``W_enc = W_dec.T``, zero biases.

        The tied start (encoder = decoder transpose) is the SAELens / OpenAI topk
        initialisation; jumprelu thresholds start at ``jumprelu_init_threshold``.
        """
        nn.init.kaiming_uniform_(self.W_dec)
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.architecture == "jumprelu":
            self.threshold.fill_(self.jumprelu_init_threshold)

    # ------------------------------------------------------------------ encoding
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SparseAutoencoder expects a torch.Tensor, got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(
                f"SparseAutoencoder expects floating-point hidden states, got dtype {x.dtype}."
            )
        if x.dim() == 0 or x.shape[-1] != self.d_in:
            raise ValueError(
                f"SparseAutoencoder expected inputs of shape (..., d_in={self.d_in}), got shape "
                f"{tuple(x.shape)}; pass hidden states of the layer the SAE was trained on or "
                f"build the SAE with d_in={x.shape[-1] if x.dim() else '?'}."
            )

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations ``(x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc``.

        Args:
            x: hidden states (..., d_in); cast to the SAE dtype.

        Returns:
            Tensor (..., d_sae). Dense: call it on a few rows at a time for large d_sae.
        """
        self._check_input(x)
        sae_in = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        # The bias is added in place: the same numbers as `@ W_enc + b_enc` without a second
        # (..., d_sae) buffer (the product's backward needs its inputs, not its output).
        return (sae_in @ self.W_enc).add_(self.b_enc)

    def _effective_k(self) -> int:
        return self.k if self.max_active is None else min(self.k, self.max_active)

    def _activate(self, pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
        """Elementwise activation for relu / jumprelu (also used on gathered entries).

        ``threshold`` is the (relu'd) jumprelu threshold broadcastable to ``pre``.
        """
        if self.architecture == "jumprelu":
            return pre * (pre > threshold).to(pre.dtype)
        return F.relu(pre)

    def _apply_activation_threshold(self, acts: torch.Tensor) -> torch.Tensor:
        # Upstream SegCompass zeroes |a| < threshold before the codebook (threshold 2.0).
        if self.activation_threshold > 0:
            acts = acts.masked_fill(acts.abs() < self.activation_threshold, 0)
        return acts

    def _select_in_place(self, scores: torch.Tensor) -> torch.Tensor:
        """Turn pre-activations (C, d_sae) into relu / jumprelu activations after the activation
        threshold, in place (no grad; no (C, d_sae) copy is made). Returns ``scores``."""
        if self.architecture == "jumprelu":
            scores.masked_fill_(scores <= self.threshold.detach().relu(), 0)
        else:
            scores.relu_()
        if self.activation_threshold > 0:
            # activations are >= 0 here, so |a| < t is a < t; threshold_ keeps a > t', and
            # t' = the float just below t keeps exactly a >= t, as `_apply_activation_threshold`.
            t = torch.tensor(self.activation_threshold, dtype=scores.dtype)
            below = torch.nextafter(t, torch.tensor(-math.inf, dtype=scores.dtype))
            F.threshold_(scores, float(below), 0.0)
        return scores

    def _select(
        self, pre: torch.Tensor, in_place: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The latents a chunk keeps, from its pre-activations (C, d_sae), without autograd.

        Returns (indices (C, n), kept (C, n) activated + thresholded values or None, the
        selection's own values: topk's pre-activations or `kept`). `in_place` lets relu /
        jumprelu overwrite `pre` (no (C, d_sae) copy)."""
        with torch.no_grad():
            if self.architecture == "topk":
                top = pre.topk(self._effective_k(), dim=-1)  # (C, k)
                return top.indices, None, top.values
            scores = self._select_in_place(pre if in_place else pre.detach().clone())
            # n = largest active count (at least one slot, so that downstream attention
            # always has a key), at most max_active
            indices, kept = _pack_positive(scores, self.max_active)  # (C, n) each
            return indices, kept, kept

    def _values_from_picked(
        self, picked: torch.Tensor, indices: torch.Tensor, kept: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Activate the picked pre-activations (C, n) of the selection -> (values, indices)."""
        if self.architecture == "topk":
            values = F.relu(picked)
        else:
            threshold = (
                self.threshold.detach().relu()[indices] if self.architecture == "jumprelu" else None
            )
            values = self._activate(picked, threshold)
            # padding slots (value 0 in the selection) may point at an active column
            values = values.masked_fill(kept == 0, 0)
        values = self._apply_activation_threshold(values)
        return values, indices.masked_fill(values == 0, 0)

    def _encode_rows(self, x_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse codes of a (C, d_in) chunk -> (values (C, n_c), indices (C, n_c)).

        The chunk's pre-activations (C, d_sae) are the only dense buffer. Without autograd
        (inference, rollout scoring) the selection works in place on that buffer and the kept
        values are those of the selection (`topk`, or `_pack_positive` for relu / jumprelu:
        every active latent, largest first); with autograd the selection runs on a detached
        copy and the kept pre-activations are picked from the graph, so that gradients flow
        to W_enc, b_enc and b_dec through the kept entries only. Both give the same numbers.
        """
        pre = self.pre_activations(x_rows)  # (C, d_sae)
        track = torch.is_grad_enabled() and pre.requires_grad
        indices, kept, selected = self._select(pre, in_place=not track)
        if not track:
            del pre  # free the chunk's dense buffer before the small tensors below
            if self.architecture == "topk":
                values = self._apply_activation_threshold(F.relu(selected))
            else:  # already activated and thresholded in place
                values = kept
            return values, indices.masked_fill(values == 0, 0)
        # Pick the kept pre-activations and activate only those. Advanced indexing (unlike
        # gather) saves only the index for backward, so autograd keeps (C, n) tensors and
        # the chunk's dense (C, d_sae) buffer is freed when this function returns.
        rows = torch.arange(indices.shape[0], device=indices.device)[:, None]  # (C, 1)
        return self._values_from_picked(pre[rows, indices], indices, kept)

    def encode_pair(self, x: torch.Tensor) -> tuple[SparseCodes, SparseCodes]:
        """``(encode(x), encode(x.detach()))`` from one pre-activation product and selection.

        The same numbers as the two calls; the first's gradient reaches ``x`` and the SAE,
        the second's only the SAE (its reconstruction loss trains the SAE, not the layers
        below). Each chunk's product and top-k run once, without autograd; the kept entries
        enter the graph twice through `_PickedPreActivations`, whose backward is the dense
        product's. Without autograd both are ``encode(x)``.
        """
        self._check_input(x)
        params = (self.W_enc, self.b_enc, self.b_dec)
        if not torch.is_grad_enabled() or not (
            x.requires_grad or any(p.requires_grad for p in params)
        ):
            codes = self.encode(x)
            return codes, codes
        lead = x.shape[:-1]
        pieces: tuple[list, list] = ([], [])
        for x_rows in self._row_chunks(x):
            with torch.no_grad():
                pre = self.pre_activations(x_rows)  # (C, d_sae)
            indices, kept, _ = self._select(pre, in_place=False)
            rows = torch.arange(indices.shape[0], device=indices.device)[:, None]
            picked = pre[rows, indices]  # (C, n)
            del pre
            for source, out in zip((x_rows, x_rows.detach()), pieces, strict=True):
                sae_in = source.to(self.W_enc.dtype)
                if self.apply_b_dec_to_input:
                    sae_in = sae_in - self.b_dec
                entries = _PickedPreActivations.apply(
                    sae_in, self.W_enc, self.b_enc, picked, indices
                )
                out.append(self._values_from_picked(entries, indices, kept))
        if not pieces[0]:
            codes = self.encode(x)
            return codes, codes
        result = []
        for out in pieces:
            n = max(v.shape[-1] for v, _ in out)
            values = torch.cat([F.pad(v, (0, n - v.shape[-1])) for v, _ in out])  # (N, n)
            indices = torch.cat([F.pad(i, (0, n - i.shape[-1])) for _, i in out])  # (N, n)
            result.append(SparseCodes(indices.reshape(*lead, n), values.reshape(*lead, n)))
        return result[0], result[1]

    def _row_chunks(self, x: torch.Tensor):
        rows = x.reshape(-1, self.d_in)  # (N, d_in), N = prod(leading dims)
        for start in range(0, rows.shape[0], self.chunk_size):
            yield rows[start : start + self.chunk_size]

    def encode(self, x: torch.Tensor) -> SparseCodes:
        """Encode hidden states into sparse codes, never building a dense (..., d_sae) code.

        Args:
            x: hidden states (..., d_in).

        Returns:
            :class:`SparseCodes` of shape (..., n): n = ``min(k, max_active)`` for topk; for
            relu / jumprelu n = the largest number of active latents at any position (at
            least 1, at most ``max_active``), other positions padded with value 0, index 0.
        """
        self._check_input(x)
        lead = x.shape[:-1]
        pieces = [self._encode_rows(rows) for rows in self._row_chunks(x)]
        if not pieces:  # no positions at all
            n = self._effective_k() if self.architecture == "topk" else 1
            values = x.new_zeros(*lead, n, dtype=self.W_enc.dtype)
            return SparseCodes(torch.zeros(*lead, n, dtype=torch.long, device=x.device), values)
        n = max(v.shape[-1] for v, _ in pieces)
        values = torch.cat([F.pad(v, (0, n - v.shape[-1])) for v, _ in pieces])  # (N, n)
        indices = torch.cat([F.pad(i, (0, n - i.shape[-1])) for _, i in pieces])  # (N, n)
        return SparseCodes(indices.reshape(*lead, n), values.reshape(*lead, n))  # (..., n)

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes (..., d_sae) with exactly the numbers of :meth:`encode`.

        The reference path (upstream SegCompass feeds dense codes to its codebook) and the
        training path of a jumprelu threshold (pseudo-gradient, see the class docstring).
        """
        self._check_input(x)
        lead = x.shape[:-1]
        pieces = []
        for rows in self._row_chunks(x):
            pre = self.pre_activations(rows)  # (C, d_sae)
            if self.architecture == "topk":
                top = pre.topk(self._effective_k(), dim=-1)
                acts = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
            elif self.architecture == "jumprelu":
                acts = _JumpReLUWithThresholdGradient.apply(
                    pre, self.threshold.relu(), self.jumprelu_bandwidth
                )
            else:
                acts = F.relu(pre)
            acts = self._apply_activation_threshold(acts)
            if self.architecture != "topk" and self.max_active is not None:
                keep = acts.detach().topk(self.max_active, dim=-1).indices
                mask = torch.zeros_like(acts, dtype=torch.bool).scatter(-1, keep, True)
                acts = acts * mask.to(acts.dtype)
            pieces.append(acts)
        if not pieces:
            return x.new_zeros(*lead, self.d_sae, dtype=self.W_enc.dtype)
        return torch.cat(pieces).reshape(*lead, self.d_sae)  # (..., d_sae)

    # ------------------------------------------------------------------ decoding
    def decode(self, codes: SparseCodes | torch.Tensor) -> torch.Tensor:
        """Reconstruct hidden states: ``codes @ W_dec + b_dec``.

        Args:
            codes: :class:`SparseCodes` (..., n) (decoded with an embedding bag over the
                active rows of W_dec, no dense code is built) or dense codes (..., d_sae).

        Returns:
            Tensor (..., d_in).
        """
        if isinstance(codes, torch.Tensor):
            if codes.dim() == 0 or codes.shape[-1] != self.d_sae:
                raise ValueError(
                    f"Dense SAE codes must have shape (..., d_sae={self.d_sae}), got "
                    f"{tuple(codes.shape)}; pass SparseCodes from encode() or encode_dense()."
                )
            return codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if not (isinstance(codes, tuple) and len(codes) == 2):
            raise TypeError(
                "decode() expects SparseCodes(indices, values) or a dense tensor (..., d_sae), "
                f"got {type(codes).__name__}."
            )
        indices, values = codes
        if indices.shape != values.shape or indices.dim() == 0:
            raise ValueError(
                "SparseCodes indices and values must have the same shape (..., n), got "
                f"{tuple(indices.shape)} and {tuple(values.shape)}."
            )
        if indices.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"SparseCodes indices must be integers, got dtype {indices.dtype}.")
        lead, n = indices.shape[:-1], indices.shape[-1]
        if n == 0 or indices.numel() == 0:
            return self.b_dec.expand(*lead, self.d_in).clone()
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= self.d_sae:
            raise ValueError(
                f"SparseCodes indices must lie in [0, d_sae={self.d_sae}), got values in "
                f"[{low}, {high}]; were the codes made by an SAE of another width?"
            )
        flat_indices = indices.reshape(-1, n).long()  # (N, n)
        flat_values = values.reshape(-1, n).to(self.W_dec.dtype)  # (N, n)
        out = F.embedding_bag(
            flat_indices, self.W_dec, per_sample_weights=flat_values, mode="sum"
        )  # (N, d_in)
        return (out + self.b_dec).reshape(*lead, self.d_in)  # (..., d_in)

    def forward(self, x: torch.Tensor) -> SparseAutoencoderOutput:
        """Encode then decode ``x`` (..., d_in); see :class:`SparseAutoencoderOutput`."""
        codes = self.encode(x)
        reconstruction = self.decode(codes)
        fvu = fraction_of_variance_unexplained(x.to(reconstruction.dtype), reconstruction)
        return SparseAutoencoderOutput(reconstruction=reconstruction, codes=codes, fvu=fvu)

    # ------------------------------------------------------------------ SAELens IO
    def to_sae_lens_config(
        self, *, hook_name: str | None = None, hook_layer: int | None = None
    ) -> dict:
        """The SAELens 6.x ``cfg.json`` dict describing this SAE."""
        return _to_sae_lens_config(self, hook_name=hook_name, hook_layer=hook_layer)

    def save(
        self,
        folder: str | os.PathLike,
        *,
        hook_name: str | None = None,
        hook_layer: int | None = None,
    ) -> None:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` (SAELens format) to ``folder``."""
        _save_sae(self, folder, hook_name=hook_name, hook_layer=hook_layer)

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        activation_threshold: float | None = None,
        max_active: int | None = None,
        chunk_size: int | None = None,
    ) -> SparseAutoencoder:
        """Load an SAE folder in SAELens format; see `sae_lens_format.load_sae` for the
        layouts read, the arguments and the errors."""
        return _load_sae(
            cls,
            folder,
            device,
            dtype,
            activation_threshold=activation_threshold,
            max_active=max_active,
            chunk_size=chunk_size,
        )


# ---------------------------------------------------------------------- metrics
def fraction_of_variance_unexplained(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """``sum((x - recon)^2) / sum((x - mean(x))^2)``, the mean taken over all positions.

    Args:
        x: hidden states (..., d_in).
        reconstruction: the SAE reconstruction, same shape.

    Returns:
        Scalar tensor (differentiable). 0 is a perfect reconstruction, 1 is as good as
        predicting the mean. A batch without variance (a single position) divides by a
        tiny epsilon instead of zero.

    >>> x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    >>> float(fraction_of_variance_unexplained(x, torch.tensor([[1.0, 1.0], [3.0, 0.0]])))
    0.5
    """
    if x.shape != reconstruction.shape:
        raise ValueError(
            f"x and reconstruction must have the same shape, got {tuple(x.shape)} and "
            f"{tuple(reconstruction.shape)}."
        )
    rows = x.reshape(-1, x.shape[-1])  # (N, d_in)
    recon_rows = reconstruction.reshape(-1, x.shape[-1])  # (N, d_in)
    residual = (rows - recon_rows).pow(2).sum()
    total = (rows - rows.mean(0, keepdim=True)).pow(2).sum()
    return residual / total.clamp_min(torch.finfo(total.dtype).eps)


def l0(codes: SparseCodes | torch.Tensor) -> torch.Tensor:
    """Mean number of active (non-zero) latents per position.

    Args:
        codes: :class:`SparseCodes` (..., n) or dense codes (..., d_sae).

    Returns:
        Scalar float tensor.

    >>> float(l0(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])))
    1.0
    """
    values = codes.values if isinstance(codes, SparseCodes) else codes
    return (values != 0).sum(-1).to(torch.float32).mean()
