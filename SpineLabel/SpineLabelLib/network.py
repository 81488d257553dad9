"""The network: a compact 3D U-Net with two heads.

* tissue head, full resolution: background, vertebral body, posterior elements, intervertebral disc
  (``TISSUE_NAMES``); vertebral bodies separated by discs give one connected component per vertebra.
* level head, half resolution: which level of ``vertebrae.LEVELS`` a vertebra voxel belongs to; averaged over a
  component it gives the per-level scores the sequence model chains.

Input and output tensors are (batch, channel, z, y, x) on the model's grid (see ``io.canonical_grid``).
"""

from __future__ import annotations

import torch
from torch import nn

from .vertebrae import LEVELS, TISSUE_NAMES

__all__ = ["SpineUNet"]


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class SpineUNet(nn.Module):
    """3D U-Net, ``len(channels)`` resolution levels, each level halving the grid.

    Args:
        channels: feature channels per level, finest first. The finest level has one convolution on each side,
            the others two (keeps the full-resolution cost low on a CPU).
        n_levels: classes of the level head (defaults to ``len(LEVELS)``).

    Input spatial size must be divisible by ``2 ** (len(channels) - 1)``.

    Raises:
        ValueError: fewer than three levels (the level head sits on the second, with a coarser one below it).
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 64, 96), n_levels: int = len(LEVELS)):
        super().__init__()
        if len(channels) < 3:
            raise ValueError(f"channels {tuple(channels)}: a SpineUNet has three resolution levels or more")
        self.channels = tuple(channels)
        self.stem = _conv(1, channels[0])
        self.down = nn.ModuleList(
            nn.Sequential(_conv(channels[i - 1], channels[i], stride=2), _conv(channels[i], channels[i]))
            for i in range(1, len(channels))
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(channels[i], channels[i - 1], 2, stride=2) for i in range(len(channels) - 1, 0, -1)
        )
        self.merge = nn.ModuleList(
            _conv(2 * channels[i - 1], channels[i - 1]) if i == 1
            else nn.Sequential(_conv(2 * channels[i - 1], channels[i - 1]), _conv(channels[i - 1], channels[i - 1]))
            for i in range(len(channels) - 1, 0, -1)
        )
        self.tissue_head = nn.Conv3d(channels[0], len(TISSUE_NAMES), 1)
        self.level_head = nn.Conv3d(channels[1], n_levels, 1)

    @property
    def divisor(self) -> int:
        """What each of the input's Z, Y, X must be a multiple of (2 to the number of downsamplings)."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor, levels_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x: float32 (B, 1, Z, Y, X), normalised intensities; Z, Y, X multiples of ``divisor`` (else the skip
        connections do not match and torch raises).

        Args:
            levels_only: stop at the level head: no full-resolution decoder, no tissue logits (about half
                the time of a whole pass on a CPU).

        Returns:
            tissue logits (B, 4, Z, Y, X), or None with ``levels_only``, and level logits (B, n_levels, Z/2, Y/2, X/2).
            float32; under bfloat16 autocast the level logits are bfloat16, the tissue logits still float32 (the
            float32 bias of ``_pointwise`` promotes them).
        """
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        y = skips.pop()
        level_logits = None
        for up, merge in zip(self.up, self.merge):
            y = merge(torch.cat([up(y), skips.pop()], dim=1))
            if len(skips) == 1:
                level_logits = self.level_head(y)
                if levels_only:
                    return None, level_logits
        return _pointwise(self.tissue_head, y), level_logits


def _pointwise(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 convolution as a channel matrix product: the same result, several times faster on a CPU for the
    few channels of the full-resolution head. ``x`` float (B, C, Z, Y, X) -> (B, out_channels, Z, Y, X): float32 with
    ``conv``'s float32 parameters, also for a bfloat16 ``x`` under autocast (the bias add promotes)."""
    out = torch.einsum("oc,bczyx->bozyx", conv.weight[:, :, 0, 0, 0], x)
    return out + conv.bias.view(1, -1, 1, 1, 1)
