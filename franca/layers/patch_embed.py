"""Patch embedding: ``(B, C, H, W)`` image → ``(B, (H/p)·(W/p), D)`` tokens by a stride-``p`` convolution."""

from __future__ import annotations

from torch import Tensor, nn


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class PatchEmbed(nn.Module):
    """Non-overlapping ``p×p`` patches linearly projected to ``embed_dim`` (keys ``patch_embed.proj.*``).

    ``img_size`` only fixes ``num_patches`` (the size of the learned position embedding); any input whose sides
    are multiples of the patch size is accepted, tokens in row-major (height, then width) order.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.patches_resolution = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ValueError(
                f"image size {height}×{width} is not a multiple of the patch size "
                f"{self.patch_size[0]}×{self.patch_size[1]}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)
