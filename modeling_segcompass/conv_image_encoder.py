"""ConvImageEncoder: the tiny default's image encoder (SAM frame -> (B, C, E, E)).

A SAM ViT trained from scratch learns far slower on 2 CPU
cores than two stride-2 convolutions with coordinate channels; real checkpoints use
`SamVisionEncoder` instead (config.image_encoder_type = "sam").

This file travels with saved models (remote code): it imports only torch.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvImageEncoder(nn.Module):
    """Two stride-2 conv stages (x4 downsampling) with x/y coordinate channels.

    Args:
        out_channels: C, the image-embedding width (the mask decoder's hidden size).
        width: hidden width of the conv stages.
        in_channels: image channels (3).
    """

    def __init__(self, *, out_channels: int, width: int = 48, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels + 2, width, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
        )
        self.head = nn.Conv2d(width + 2, out_channels, kernel_size=1)
        self.norm = nn.GroupNorm(1, out_channels)

    @staticmethod
    def _coords(x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        ys = torch.linspace(-1.0, 1.0, height, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, width, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_x, grid_y]).unsqueeze(0).expand(batch, -1, -1, -1)  # (B, 2, H, W)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised SAM-frame pixels -> (B, C, S/4, S/4)."""
        if pixel_values.dim() != 4:
            raise ValueError(
                "ConvImageEncoder: sam_pixel_values must be (B, 3, S, S); got "
                f"{tuple(pixel_values.shape)}."
            )
        hidden = self.stem(torch.cat([pixel_values, self._coords(pixel_values)], dim=1))
        hidden = torch.cat([hidden, self._coords(hidden)], dim=1)  # (B, width+2, S/4, S/4)
        return self.norm(self.head(hidden))


__all__ = ["ConvImageEncoder"]
