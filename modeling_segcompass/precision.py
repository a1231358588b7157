"""Lower precision as transformers loads it: `cast_to_dtype` and the dtype helpers.

`model.to(torch.bfloat16)` casts every floating tensor; `from_pretrained(dtype=...)` does not
(RoPE's `inv_freq` stays float32, `_keep_in_fp32_modules` stay float32). A model cast with
`cast_to_dtype` holds the tensors a save / reload would give it, so it returns the same numbers
before and after.

This file travels with saved models (remote code): it imports only torch and transformers.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel


def floating_dtype(module: nn.Module | None) -> torch.dtype | None:
    """dtype of the first floating-point parameter of `module` (None when it has none)."""
    if module is None:
        return None
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def resolve_float_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a dtype or its name ("bfloat16", "torch.float16")."""
    resolved = dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"Expected a floating-point torch dtype or its name (e.g. torch.bfloat16 or "
            f"'bfloat16'), got {dtype!r}."
        )
    return resolved


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to `dtype` inside the block (what `from_pretrained` builds under)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def set_config_dtype(config: PreTrainedConfig, dtype: torch.dtype) -> None:
    """Record `dtype` on a config and all its sub-configs, as `from_pretrained` does."""
    config.dtype = dtype
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, PreTrainedConfig):
            set_config_dtype(sub, dtype)


def cast_to_dtype(model: PreTrainedModel, dtype: torch.dtype | str) -> PreTrainedModel:
    """Cast in place to `dtype` exactly as `from_pretrained(path, dtype=dtype)` loads.

    `model.to(dtype)` casts every floating tensor; transformers' loading does not: a
    tensor takes the dtype it is built with under `dtype` as torch's default, so buffers
    that a module builds in float32 on purpose (RoPE's `inv_freq`) stay float32, and the
    modules in `_keep_in_fp32_modules` (float16) / `_keep_in_fp32_modules_strict`
    (float16, bfloat16) are float32. This builds the model's skeleton on the meta device
    under `dtype` and gives every parameter and buffer its skeleton's dtype, so a model
    cast here and the same model saved and reloaded hold the same tensors and return the
    same numbers. The config (and its sub-configs) records `dtype`, as after loading.

    Args:
        dtype: a floating torch dtype or its name ("bfloat16", "float16", "float32").

    Returns:
        The model itmodel.
    """
    dtype = resolve_float_dtype(dtype)
    config = copy.deepcopy(model.config)
    set_config_dtype(config, dtype)
    with torch.device("meta"), default_dtype(dtype):
        skeleton = type(model)(config)
    keep = set()
    if dtype == torch.float16:
        keep |= set(getattr(skeleton, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(skeleton, "_keep_in_fp32_modules_strict", None) or ())
    # transformers matches these names as globs searched anywhere in the tensor's name
    pattern = re.compile("|".join(k.replace("*", ".*") for k in sorted(keep))) if keep else None
    built = {
        name: tensor.dtype
        for name, tensor in (
            *skeleton.named_parameters(remove_duplicate=False),
            *skeleton.named_buffers(remove_duplicate=False),
        )
    }
    del skeleton

    def target(name: str, tensor: torch.Tensor) -> torch.dtype:
        if not tensor.is_floating_point():
            return tensor.dtype
        if pattern is not None and pattern.search(name):
            return torch.float32
        return built.get(name, dtype)  # a tensor the config does not build (e.g. an adapter)

    with torch.no_grad():
        for module_name, module in model.named_modules(remove_duplicate=False):
            prefix = f"{module_name}." if module_name else ""
            for name, param in module._parameters.items():
                if param is None:
                    continue
                wanted = target(prefix + name, param)
                if param.dtype != wanted:
                    param.data = param.data.to(wanted)
                    if param.grad is not None:
                        param.grad = param.grad.to(wanted)
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.dtype != target(prefix + name, buffer):
                    module._buffers[name] = buffer.to(target(prefix + name, buffer))
    set_config_dtype(model.config, dtype)
    return model


__all__ = ["cast_to_dtype", "floating_dtype", "resolve_float_dtype"]
