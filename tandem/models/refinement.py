"""Refinement stage: a dense UNet with grouped convolutions that paints the scene-token grid.

Scene tokens [B, h, w] are embedded as an h x w feature map, pass a UNet at grid resolution
(downsampling with skip connections), then x2 upsampling stages up to the image resolution, and
leave as RGB in [0, 1]: ``image`` [B, 3, h * f, w * f]. One forward pass, no iteration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # annotations only (torch alone imports the models)
    from tandem.config import ModelConfig



class GroupedResBlock(nn.Module):
    """ResNeXt-style block: grouped 3x3 (spatial, per group) then pointwise 1x1 (mixes groups)."""

    def __init__(self, c_in: int, c_out: int, group_width: int, norm_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, groups=c_in // group_width)
        self.norm2 = nn.GroupNorm(norm_groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class RefinementUNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        r = config.refinement
        block = lambda c_in, c_out: GroupedResBlock(c_in, c_out, r.group_width, r.norm_groups)  # noqa: E731
        self.codebook_size = config.scene.codebook_size
        channels = r.unet_channels
        self.token_embedding = nn.Embedding(self.codebook_size, r.embed_dim)
        self.stem = nn.Conv2d(r.embed_dim, channels[0], 3, padding=1)
        n = r.blocks_per_level
        self.down_blocks = nn.ModuleList(nn.Sequential(*(block(c, c) for _ in range(n))) for c in channels)
        self.downsamplers = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1) for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.mid = block(channels[-1], channels[-1])
        self.upsamplers = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in zip(channels[:0:-1], channels[-2::-1])
        )
        self.up_blocks = nn.ModuleList(
            nn.Sequential(block(2 * c, c), *(block(c, c) for _ in range(n - 1))) for c in channels[-2::-1]
        )
        decoder = []
        c_prev = channels[0]
        for c in r.decoder_channels:
            decoder.append(nn.ModuleDict({"conv": nn.Conv2d(c_prev, c, 3, padding=1), "block": block(c, c)}))
            c_prev = c
        self.decoder = nn.ModuleList(decoder)
        self.head_norm = nn.GroupNorm(r.norm_groups, c_prev)
        self.head = nn.Conv2d(c_prev, 3, 3, padding=1)

    def reset_parameters(self) -> None:
        for module in self.modules():
            self.init_module(module)

    @staticmethod
    def init_module(module: nn.Module) -> None:
        """Initialise ``module``'s own parameters (not its children's); see ReasoningTransformer."""
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, scene_tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(scene_tokens).permute(0, 3, 1, 2)  # [B, C, h, w]
        x = self.stem(x)
        skips = []
        for i, blk in enumerate(self.down_blocks):
            x = blk(x)
            if i < len(self.downsamplers):
                skips.append(x)
                x = self.downsamplers[i](x)
        x = self.mid(x)
        for up, blk in zip(self.upsamplers, self.up_blocks):
            x = up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            x = blk(torch.cat([x, skips.pop()], dim=1))
        for stage in self.decoder:
            x = stage["conv"](F.interpolate(x, scale_factor=2.0, mode="nearest"))
            x = stage["block"](x)
        return torch.sigmoid(self.head(F.silu(self.head_norm(x))))
