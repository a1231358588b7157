"""The SAELens folder format of an SAE: ``cfg.json`` + ``sae_weights.safetensors``.

`SparseAutoencoder.save` / `.load` / `.to_sae_lens_config` call these. Reads the SAELens 6.x
layout and the older flat ones; writes 6.x. Parameters are named as in SAELens (``W_enc``,
``b_enc``, ``W_dec``, ``b_dec``, jumprelu ``threshold``), so no renaming happens here.

This is a remote-code file: it imports only the standard library, torch and safetensors.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from .sparse_autoencoder import SparseAutoencoder

logger = logging.getLogger(__name__)

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
# SAELens calls the ReLU SAE "standard"; map our names to theirs and back.
_TO_SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
_FROM_SAELENS_ARCHITECTURE = {
    "standard": "relu",
    "relu": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
}
# The cfg.json layout we write is that of SAELens 6.x (hook names inside "metadata"). SAELens
# reads `metadata.sae_lens_version` to decide which layout a folder uses; this names the
# layout, it does not claim that SAELens produced the file.
SAELENS_CFG_LAYOUT_VERSION = "6.0.0"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def to_sae_lens_config(
    sae: SparseAutoencoder, *, hook_name: str | None = None, hook_layer: int | None = None
) -> dict:
    """The SAELens 6.x ``cfg.json`` dict describing this SAE."""
    dtype_name = str(sae.W_enc.dtype).replace("torch.", "")
    metadata = {"sae_lens_version": SAELENS_CFG_LAYOUT_VERSION, **sae.sae_metadata}
    if hook_name is not None:
        metadata["hook_name"] = hook_name
    if hook_layer is not None:
        metadata["hook_layer"] = hook_layer
    # SegCompass-only encoding options live in metadata, which SAELens keeps verbatim.
    metadata["segcompass"] = {
        "activation_threshold": sae.activation_threshold,
        "max_active": sae.max_active,
        "chunk_size": sae.chunk_size,
    }
    cfg = {
        "architecture": _TO_SAELENS_ARCHITECTURE[sae.architecture],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype_name,
        # Where SAELens puts the weights by default; "cpu" loads on any machine.
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


def save_sae(
    sae: SparseAutoencoder,
    folder: str | os.PathLike,
    *,
    hook_name: str | None = None,
    hook_layer: int | None = None,
) -> None:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` (SAELens format) to ``folder``."""
    os.makedirs(folder, exist_ok=True)
    cfg = to_sae_lens_config(sae, hook_name=hook_name, hook_layer=hook_layer)
    tensors = {
        name: param.detach().to("cpu").contiguous().clone()
        for name, param in sae.named_parameters()
    }
    save_file(tensors, os.path.join(folder, SAE_WEIGHTS_FILENAME), metadata={"format": "pt"})
    with open(os.path.join(folder, SAE_CFG_FILENAME), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    logger.info(
        "Saved %s SAE (d_in=%d, d_sae=%d) to %s",
        sae.architecture,
        sae.d_in,
        sae.d_sae,
        folder,
    )


def load_sae(
    cls: type[SparseAutoencoder],
    folder: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    activation_threshold: float | None = None,
    max_active: int | None = None,
    chunk_size: int | None = None,
) -> SparseAutoencoder:
    """Load an SAE folder in SAELens format (``cfg.json`` + ``sae_weights.safetensors``).

    Reads SAELens 6.x layouts and the older flat ones (``activation_fn_str`` /
    ``activation_fn_kwargs`` for topk, ``hook_point``), with safetensors only.

    Args:
        folder: the folder.
        device: where to put the weights (default CPU; the cfg's device is ignored).
        dtype: torch dtype or its name; default the cfg's ``dtype`` (else float32).
        activation_threshold, max_active, chunk_size: override the encoding options
            stored by :meth:`save` (defaults 0.0, None, 512 for foreign folders).

    Raises:
        FileNotFoundError: missing folder, cfg.json or weights (a folder with only
            pickle files is refused: convert it to safetensors).
        ValueError: unsupported architecture or normalisation, missing or misshapen
            tensors.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"SAE folder {folder!r} does not exist or is not a folder.")
    files = sorted(os.listdir(folder))
    cfg_path = os.path.join(folder, SAE_CFG_FILENAME)
    weights_path = os.path.join(folder, SAE_WEIGHTS_FILENAME)
    if not os.path.isfile(weights_path):
        pickles = [f for f in files if f.lower().endswith(_PICKLE_SUFFIXES)]
        if pickles:
            raise FileNotFoundError(
                f"SAE folder {folder!r} holds only pickle checkpoints {pickles}; refusing to "
                "unpickle (it can run arbitrary code). Convert it to safetensors, e.g. "
                "safetensors.torch.save_file(torch.load(path, weights_only=True), "
                f"'{SAE_WEIGHTS_FILENAME}') in a trusted environment, and add a cfg.json."
            )
        raise FileNotFoundError(
            f"SAE folder {folder!r} has no {SAE_WEIGHTS_FILENAME} (found {files}); expected "
            f"the SAELens format: {SAE_CFG_FILENAME} + {SAE_WEIGHTS_FILENAME}."
        )
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"SAE folder {folder!r} has no {SAE_CFG_FILENAME} (found {files}); expected "
            f"the SAELens format: {SAE_CFG_FILENAME} + {SAE_WEIGHTS_FILENAME}."
        )
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{cfg_path} is not valid JSON ({error}); expected a SAELens cfg.json. "
            "Download or save the SAE again."
        ) from error
    options = _parse_sae_lens_config(cfg, source=cfg_path)

    if dtype is None:
        dtype = options.pop("dtype")
    else:
        options.pop("dtype")
    torch_dtype = _resolve_dtype(dtype, source="the `dtype` argument")
    stored = options.pop("segcompass")
    overrides = {
        "activation_threshold": activation_threshold,
        "max_active": max_active,
        "chunk_size": chunk_size,
    }
    for name, value in overrides.items():
        if value is not None:
            stored[name] = value
    metadata = options.pop("metadata")
    rescale_by_decoder_norm = options.pop("rescale_acts_by_decoder_norm")

    try:
        state = load_file(weights_path, device="cpu")
    except Exception as error:
        if type(error).__name__ != "SafetensorError":  # safetensors' Rust-side error
            raise
        raise OSError(
            f"Could not read {weights_path}: the safetensors file is truncated or corrupted "
            f"({error}). Download or save the SAE again."
        ) from error
    state = _check_state(state, options, source=weights_path)
    if rescale_by_decoder_norm:
        # SAELens topk with rescale_acts_by_decoder_norm multiplies pre-activations by
        # ||W_dec_i|| and divides activations by it before decoding: folding the norms
        # into W_enc, b_enc, W_dec gives the same codes and reconstructions.
        norms = state["W_dec"].norm(dim=-1).clamp_min(1e-8)
        state["W_enc"] = state["W_enc"] * norms
        state["b_enc"] = state["b_enc"] * norms
        state["W_dec"] = state["W_dec"] / norms[:, None]
        logger.info("Folded decoder norms into the encoder (rescale_acts_by_decoder_norm).")

    with torch.device("meta"):
        sae = cls(**options, **stored)
    state = {name: t.to(device=device or "cpu", dtype=torch_dtype) for name, t in state.items()}
    sae.load_state_dict(state, assign=True)
    sae.sae_metadata = {k: v for k, v in metadata.items() if k != "segcompass"}
    logger.info(
        "Loaded %s SAE (d_in=%d, d_sae=%d) from %s",
        sae.architecture,
        sae.d_in,
        sae.d_sae,
        folder,
    )
    return sae


# ---------------------------------------------------------------------- SAELens cfg helpers
def _resolve_dtype(dtype: str | torch.dtype, *, source: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(
            f"Unsupported SAE dtype {dtype!r} in {source}; expected one of {sorted(_DTYPES)}."
        )
    return _DTYPES[name]


def _parse_sae_lens_config(cfg: dict, *, source: str) -> dict:
    """SAELens cfg dict (6.x or older flat layout) -> SparseAutoencoder kwargs + extras."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(cfg).__name__}.")
    for key in ("d_in", "d_sae"):
        if key not in cfg:
            raise ValueError(f"{source} lacks the required key {key!r} (SAELens cfg.json).")
    metadata = dict(cfg.get("metadata") or {})
    for old, new in (
        ("hook_point", "hook_name"),
        ("hook_name", "hook_name"),
        ("hook_layer", "hook_layer"),
        ("model_name", "model_name"),
    ):
        if old in cfg and new not in metadata:
            metadata[new] = cfg[old]

    architecture = cfg.get("architecture", "standard")
    activation_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    fn_kwargs = cfg.get("activation_fn_kwargs") or {}
    if architecture == "standard" and activation_fn == "topk":
        # SAELens < 6 stored topk SAEs as "standard" with activation_fn_str "topk".
        architecture = "topk"
    if architecture not in _FROM_SAELENS_ARCHITECTURE:
        raise ValueError(
            f"SAE architecture {architecture!r} in {source} is not supported; supported are "
            "'standard' (relu), 'topk' and 'jumprelu'. Convert the SAE to one of them."
        )
    architecture = _FROM_SAELENS_ARCHITECTURE[architecture]
    if architecture == "relu" and activation_fn not in ("relu", None):
        raise ValueError(
            f"SAE activation_fn {activation_fn!r} in {source} is not supported for a standard "
            "SAE; only 'relu' (or architecture 'topk' / 'jumprelu') is."
        )

    normalize = cfg.get("normalize_activations", "none")
    if normalize in (None, False, "none"):
        pass
    else:
        raise ValueError(
            f"normalize_activations={normalize!r} in {source} is not supported; only 'none' is. "
            "Fold the normalisation into the weights first (SAELens: "
            "sae.fold_activation_norm_scaling_factor(factor)) and save again."
        )
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in (None, "none"):
        raise ValueError(
            f"reshape_activations={reshape!r} in {source} is not supported (attention hook_z "
            "SAEs); SegCompass encodes residual-stream hidden states of shape (..., d_in)."
        )
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(
            f"{source} sets finetuning_scaling_factor, which is not supported; fold the "
            "scaling factor into W_dec and save again."
        )

    options: dict = {
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "architecture": architecture,
        "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True),
        "dtype": _resolve_dtype(cfg.get("dtype", "float32"), source=source),
        "metadata": metadata,
        "rescale_acts_by_decoder_norm": bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        "segcompass": {
            key: value
            for key, value in (metadata.get("segcompass") or {}).items()
            if key in ("activation_threshold", "max_active", "chunk_size")
        },
    }
    if architecture == "topk":
        k = cfg.get("k", fn_kwargs.get("k"))
        if k is None:
            raise ValueError(
                f"{source} describes a topk SAE but has no 'k' (nor activation_fn_kwargs.k)."
            )
        options["k"] = k
    return options


def _check_state(state: dict, options: dict, *, source: str) -> dict:
    """Validate tensor names and shapes of a SAELens weights file against its cfg."""
    state = dict(state)
    if "log_threshold" in state and "threshold" not in state:
        # Older SAELens jumprelu checkpoints store log(threshold).
        state["threshold"] = state.pop("log_threshold").exp()
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise ValueError(
            f"{source} holds a non-trivial 'scaling_factor' tensor, which is not supported; "
            "fold it into W_dec and save again."
        )
    d_in, d_sae = options["d_in"], options["d_sae"]
    expected = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    if options["architecture"] == "jumprelu":
        expected["threshold"] = (d_sae,)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(
            f"{source} lacks the tensors {missing} required by a {options['architecture']} SAE "
            f"(found {sorted(state)})."
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(
            f"{source} holds tensors {unexpected} that a {options['architecture']} SAE does not "
            f"have (expected exactly {sorted(expected)}); is the cfg's architecture right?"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(
                f"Tensor {name!r} in {source} has shape {tuple(state[name].shape)}, but the "
                f"cfg (d_in={d_in}, d_sae={d_sae}) requires {shape}."
            )
    return state


__all__ = ["SAE_CFG_FILENAME", "SAE_WEIGHTS_FILENAME", "load_sae", "save_sae", "to_sae_lens_config"]
