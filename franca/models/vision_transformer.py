"""The Franca / DINOv2 vision transformer and its standard sizes.

Token sequence of an image with an ``h×w`` patch grid: ``[cls, reg_1..reg_R, patch_1..patch_{h·w}]``. Patch tokens
may be replaced by the learned ``mask_token`` (iBOT masking) *before* the position embedding is added; the class
and patch tokens get the learned position embedding, bicubically resized to the patch grid (registers get none).

Blocks are stored flat (``blocks.<i>``) or, with ``block_chunks > 0``, in :class:`BlockChunk` groups for FSDP
wrapping (``blocks.<chunk>.<absolute index>``, earlier indices held by ``nn.Identity`` placeholders) exactly as in
the official checkpoints. A list of crops runs through every block in one packed pass (see
``franca.layers.attention``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from franca.layers import Block, Mlp, PatchEmbed, SwiGLUFFNFused, TokenLayout
from franca.layers.block import BlockDrops
from franca.layers.drop_path import draw_branch_drops

FFN_LAYERS = ("mlp", "swiglu", "swiglufused", "identity")


class BlockChunk(nn.ModuleList):
    """A contiguous group of blocks (one FSDP unit); ``nn.Identity`` entries are index placeholders and skipped."""

    def forward(
        self, x: Tensor, layout: TokenLayout | None = None, drops: Sequence[BlockDrops] | None = None
    ) -> Tensor:
        """``drops``: the stochastic-depth draws of this chunk's blocks, in order (default: their own)."""
        blocks = [block for block in self if not isinstance(block, nn.Identity)]
        for index, block in enumerate(blocks):
            x = block(x, layout, None if drops is None else drops[index])
        return x


def _ffn_factory(ffn_layer: str, act_layer: Callable[[], nn.Module]) -> Callable[..., nn.Module]:
    if ffn_layer == "mlp":
        return partial(Mlp, act_layer=act_layer)
    if ffn_layer in ("swiglu", "swiglufused"):
        return SwiGLUFFNFused
    if ffn_layer == "identity":
        return lambda **_: nn.Identity()
    raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {', '.join(FFN_LAYERS)}")


def _init_linear(module: nn.Module) -> None:
    """timm ViT initialisation of linear layers: weights ~ TruncNormal(0, 0.02), biases 0."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DinoVisionTransformer(nn.Module):
    """DINOv2-style ViT with register tokens, mask token, LayerScale and stochastic depth.

    Keyword arguments are those of the reference (``init_values`` is the LayerScale init, None/0 = off;
    ``interpolate_offset`` / ``interpolate_antialias`` control the position-embedding resize), plus
    ``attn_backend`` (``auto``/``sdpa``/``xformers``/``math``, see ``franca.layers.attention``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = Block,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if block_chunks < 0:
            raise ValueError(f"block_chunks must be >= 0, got {block_chunks}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        # Stochastic depth: uniform, or linearly increasing from 0 to drop_path_rate (computed on the CPU so that
        # the model can be built under a meta/cuda default device).
        if drop_path_uniform:
            drop_rates = [drop_path_rate] * depth
        else:
            drop_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        ffn = _ffn_factory(ffn_layer, act_layer)
        blocks = [
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                init_values=init_values,
                drop_path=drop_rates[i],
                norm_layer=norm_layer,
                ffn_layer=ffn,
                attn_backend=attn_backend,
            )
            for i in range(depth)
        ]
        self.chunked_blocks = block_chunks > 0
        if self.chunked_blocks:
            size = max(depth // block_chunks, 1)
            placeholder = nn.Identity()
            self.blocks = nn.ModuleList(
                BlockChunk([placeholder] * start + blocks[start : start + size]) for start in range(0, depth, size)
            )
            self._unit_sizes = [len(blocks[start : start + size]) for start in range(0, depth, size)]
        else:
            self.blocks = nn.ModuleList(blocks)
            self._unit_sizes = [1] * depth

        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.rasa_head: nn.Module | None = None
        self.init_weights()

    def compile_blocks(self) -> None:
        """``torch.compile`` every transformer block in place (``train.compile``): parameter names, checkpoints
        and FSDP units unchanged; each block is specialised on the crop layouts it sees."""
        for module in self.blocks.modules():
            if isinstance(module, Block):
                module.compile(dynamic=False)

    def init_weights(self) -> None:
        """pos_embed ~ TruncNormal(0, 0.02); cls/register tokens ~ N(0, 1e-6²); linear layers as timm; mask 0."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        self.apply(_init_linear)

    def block_list(self) -> list[nn.Module]:
        """The ``n_blocks`` transformer blocks in order, whatever the chunking."""
        if not self.chunked_blocks:
            return list(self.blocks)
        return [block for chunk in self.blocks for block in chunk if not isinstance(block, nn.Identity)]

    def interpolate_pos_encoding(self, x: Tensor, height: int, width: int) -> Tensor:
        """Position embedding ``(1, 1 + h·w, D)`` for tokens ``x`` of an image of ``height × width`` pixels.

        The stored ``M×M`` grid is resized bicubically (optionally antialiased) to ``h×w = height//p × width//p``.
        With ``interpolate_offset`` ε > 0 the resize is given as scale factors ``((h+ε)/M, (w+ε)/M)`` (which
        also sets the sampling positions, as in DINO); with ε = 0 as the output size. Square inputs with the
        stored number of patches use the table as is.
        """
        num_patches = x.shape[1] - 1
        stored = self.pos_embed.shape[1] - 1
        if num_patches == stored and height == width:
            return self.pos_embed
        grid = math.isqrt(stored)
        if grid * grid != stored:
            raise ValueError(f"cannot interpolate a position embedding of {stored} patches: not a square grid")
        rows, cols = height // self.patch_size, width // self.patch_size
        pos_embed = self.pos_embed.float()
        table = pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            offset = self.interpolate_offset
            resize = {"scale_factor": ((rows + offset) / grid, (cols + offset) / grid)}
        else:
            resize = {"size": (rows, cols)}
        table = F.interpolate(table, mode="bicubic", antialias=self.interpolate_antialias, **resize)
        if tuple(table.shape[-2:]) != (rows, cols):
            raise RuntimeError(f"position embedding resized to {tuple(table.shape[-2:])}, expected {(rows, cols)}")
        table = table.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat((pos_embed[:, :1], table), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Image ``(B, C, H, W)`` → tokens ``(B, 1 + R + N, D)``; ``masks`` ``(B, N)`` bool marks patches to mask."""
        batch, _, height, width = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, height, width)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch, -1, -1)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
        return tokens

    def _outputs(self, x: Tensor, x_norm: Tensor, masks: Tensor | None, use_rasa_head: bool) -> dict:
        start = self.num_register_tokens + 1
        out = {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:start],
            "x_norm_patchtokens": x_norm[:, start:],
            "x_prenorm": x,
            "masks": masks,
        }
        if use_rasa_head:
            if self.rasa_head is None:
                raise ValueError("use_rasa_head=True but no RASA head is attached (load one with use_rasa_head=True)")
            out["patch_token_rasa"] = self.rasa_head(out["x_norm_patchtokens"])
        return out

    def forward_features_list(
        self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None] | None = None, use_rasa_head: bool = False
    ) -> list[dict]:
        """:meth:`forward_features` of every crop batch, computed in one packed pass through the blocks."""
        masks_list = [None] * len(x_list) if masks_list is None else list(masks_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"got {len(x_list)} crop batches but {len(masks_list)} masks")
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        layout = TokenLayout.of(tokens)
        packed = layout.pack(tokens)
        drops = self._draw_drops(layout, packed)
        first = 0
        for unit, count in zip(self.blocks, self._unit_sizes):  # a block, or a chunk of ``count`` blocks
            unit_drops = None if drops is None else drops[first : first + count]
            if self.chunked_blocks:
                packed = unit(packed, layout, unit_drops)
            else:
                packed = unit(packed, layout, None if unit_drops is None else unit_drops[0])
            first += count
        # The final norm sees (B, N, D) tokens per crop batch, as in DINOv2 (a replaced norm may depend on position).
        prenorm = layout.unpack(packed)
        return [self._outputs(x, self.norm(x), m, use_rasa_head) for x, m in zip(prenorm, masks_list)]

    def _draw_drops(self, layout: TokenLayout, packed: Tensor) -> list[BlockDrops] | None:
        """Every block's stochastic-depth draws for this pass, the branches of equal rate drawn together
        (None outside training or without drop path)."""
        rates = [block.sample_drop_ratio for block in self.block_list()]
        if not self.training or not any(rates):
            return None
        draws = draw_branch_drops(layout, [rate for rate in rates for _ in range(2)], packed.device, packed.dtype)
        return [(draws[2 * i], draws[2 * i + 1]) for i in range(len(rates))]

    def forward_features(
        self,
        x: Tensor | Sequence[Tensor],
        masks: Tensor | Sequence[Tensor | None] | None = None,
        use_rasa_head: bool = False,
    ) -> dict | list[dict]:
        """Features of a batch ``(B, C, H, W)`` (a dict) or of a list of crop batches (a list of dicts).

        Keys: ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D), ``x_norm_patchtokens`` (B, N, D),
        ``x_prenorm`` (B, 1+R+N, D), ``masks``; plus ``patch_token_rasa`` (B, N, D) with ``use_rasa_head``.
        """
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks, use_rasa_head)
        return self.forward_features_list([x], [masks], use_rasa_head)[0]

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (int) or of the blocks with the given indices, in block order.

        Each output is the patch tokens ``(B, N, D)`` — ``(B, D, H/p, W/p)`` with ``reshape`` — optionally with
        the class token ``(B, D)`` as a pair; ``norm`` applies the final LayerNorm first.
        """
        blocks = self.block_list()
        take = range(len(blocks) - n, len(blocks)) if isinstance(n, int) else sorted(set(n))
        if len(take) == 0 or min(take) < 0 or max(take) >= len(blocks):
            raise ValueError(f"cannot take blocks {list(take)} of a {len(blocks)}-block model (n={n})")
        tokens = self.prepare_tokens_with_masks(x)
        batch, length, dim = tokens.shape
        layout = TokenLayout(((batch, length),))
        hidden = tokens.reshape(batch * length, dim)
        outputs = []
        for index, block in enumerate(blocks[: max(take) + 1]):
            hidden = block(hidden, layout)
            if index in take:
                outputs.append(hidden.view(batch, length, dim))
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            rows, cols = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            outputs = [out.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def forward(self, *args, is_training: bool = False, **kwargs):
        """``head(class token)``, or the :meth:`forward_features` output itself with ``is_training=True``."""
        features = self.forward_features(*args, **kwargs)
        if is_training:
            return features
        if isinstance(features, list):
            return [self.head(f["x_norm_clstoken"]) for f in features]
        return self.head(features["x_norm_clstoken"])


def _vit(size: dict, patch_size: int, num_register_tokens: int, kwargs: dict) -> DinoVisionTransformer:
    """A ViT of a standard ``size``; any key of ``size`` may be overridden through ``kwargs``."""
    return DinoVisionTransformer(
        patch_size=patch_size, num_register_tokens=num_register_tokens, **{**size, "mlp_ratio": 4, **kwargs}
    )


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-S: width 384, 12 blocks, 6 heads."""
    return _vit({"embed_dim": 384, "depth": 12, "num_heads": 6}, patch_size, num_register_tokens, kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-B: width 768, 12 blocks, 12 heads."""
    return _vit({"embed_dim": 768, "depth": 12, "num_heads": 12}, patch_size, num_register_tokens, kwargs)


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-L: width 1024, 24 blocks, 16 heads."""
    return _vit({"embed_dim": 1024, "depth": 24, "num_heads": 16}, patch_size, num_register_tokens, kwargs)


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-g (DINOv2 variant): width 1536, 40 blocks, 24 heads of 64 channels."""
    return _vit({"embed_dim": 1536, "depth": 40, "num_heads": 24}, patch_size, num_register_tokens, kwargs)


def vit_pico(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-pico (CPU demo and tests, not a released size): width 128, 6 blocks, 4 heads."""
    return _vit({"embed_dim": 128, "depth": 6, "num_heads": 4}, patch_size, num_register_tokens, kwargs)
