"""Pre-norm transformer block: ``x += ls1(attn(norm1(x)))``, then ``x += ls2(mlp(norm2(x)))``.

Both residual branches are subject to stochastic depth in training (``drop_path``): above a rate of 0.1 the
branch is computed only on the kept samples, otherwise every sample is computed and the dropped ones are
zeroed (:mod:`franca.layers.drop_path`). The ViT draws every block's branches at once and passes them in;
a block called on its own draws its two. At evaluation both are exact identities. LayerScale and the
stochastic-depth scale enter the residual sum in one ``addcmul`` (or ``index_add``), not as separate passes.

``forward`` accepts ``(B, N, D)`` tokens, a list of such tensors (multi-crop: every layer runs once over all
crops, attention is block diagonal), or packed ``(T, D)`` tokens with their :class:`TokenLayout`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from franca.layers.attention import Attention, TokenLayout
from franca.layers.drop_path import BranchDrop, add_residual, draw_branch_drops
from franca.layers.layer_scale import LayerScale
from franca.layers.mlp import Mlp

BlockDrops = tuple[BranchDrop | None, BranchDrop | None]  # the attention and FFN branches' draws


class Block(nn.Module):
    """One ViT block (keys ``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.*``, ``ls2.gamma``).

    ``ffn_layer`` is called as ``ffn_layer(in_features=dim, hidden_features=int(dim·mlp_ratio), bias=ffn_bias)``;
    ``init_values`` None or 0 disables LayerScale.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., nn.Module] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    def _attn_branch(self, x: Tensor, layout: TokenLayout) -> Tensor:
        out = self.attn(self.norm1(x), layout)
        return out if _gamma(self.ls1) is not None else self.ls1(out)

    def _ffn_branch(self, x: Tensor, layout: TokenLayout) -> Tensor:
        out = self.mlp(self.norm2(x))
        return out if _gamma(self.ls2) is not None else self.ls2(out)

    def draw_drops(self, layout: TokenLayout, x: Tensor) -> BlockDrops | None:
        """This block's stochastic-depth draws for ``layout`` (None outside training or without drop path)."""
        if not self.training or self.sample_drop_ratio == 0.0:
            return None
        attn_drop, ffn_drop = draw_branch_drops(layout, [self.sample_drop_ratio] * 2, x.device, x.dtype)
        return attn_drop, ffn_drop

    def forward_packed(self, x: Tensor, layout: TokenLayout, drops: BlockDrops | None = None) -> Tensor:
        """The block on packed ``(T, D)`` tokens laid out as ``layout``, with the given stochastic-depth draws
        (default: its own, in training)."""
        if drops is None:
            drops = self.draw_drops(layout, x) or (None, None)
        x = add_residual(x, layout, self._attn_branch, _gamma(self.ls1), drops[0])
        return add_residual(x, layout, self._ffn_branch, _gamma(self.ls2), drops[1])

    def forward(
        self, x: Tensor | list[Tensor], layout: TokenLayout | None = None, drops: BlockDrops | None = None
    ) -> Tensor | list[Tensor]:
        if layout is not None:
            return self.forward_packed(x, layout, drops)
        if isinstance(x, (list, tuple)):
            layout = TokenLayout.of(x)
            return layout.unpack(self.forward_packed(layout.pack(x), layout))
        batch, n, dim = x.shape
        return self.forward_packed(x.reshape(batch * n, dim), TokenLayout(((batch, n),))).view(batch, n, dim)


def _gamma(layer_scale: nn.Module) -> Tensor | None:
    """A LayerScale's γ (applied in the residual sum), else None (the module is applied in the branch)."""
    return layer_scale.gamma if isinstance(layer_scale, LayerScale) else None
