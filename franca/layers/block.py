"""Pre-norm transformer block: ``x += ls1(attn(norm1(x)))``, then ``x += ls2(mlp(norm2(x)))``.

Both residual branches are subject to stochastic depth in training (``drop_path``): above a rate of 0.1 the
branch is computed only on the kept samples (:func:`add_residual_on_kept_samples`), otherwise every sample is
computed and the dropped ones are zeroed (:class:`DropPath`). At evaluation both are exact identities.

``forward`` accepts ``(B, N, D)`` tokens, a list of such tensors (multi-crop: every layer runs once over all
crops, attention is block diagonal), or packed ``(T, D)`` tokens with their :class:`TokenLayout`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from franca.layers.attention import Attention, TokenLayout
from franca.layers.drop_path import DropPath, add_residual_on_kept_samples
from franca.layers.layer_scale import LayerScale
from franca.layers.mlp import Mlp

# Above this drop rate the residual is computed on the kept samples only (the gather cost then pays off).
_SUBSET_DROP_THRESHOLD = 0.1


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
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path

    def _attn_branch(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), layout))

    def _ffn_branch(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _add_residual(
        self, x: Tensor, layout: TokenLayout, branch: Callable[[Tensor, TokenLayout], Tensor], drop: nn.Module
    ) -> Tensor:
        if not self.training or self.sample_drop_ratio == 0.0:
            return x + branch(x, layout)
        if self.sample_drop_ratio > _SUBSET_DROP_THRESHOLD:
            return add_residual_on_kept_samples(x, layout, branch, self.sample_drop_ratio)
        return x + drop(branch(x, layout), layout)

    def forward_packed(self, x: Tensor, layout: TokenLayout) -> Tensor:
        """The block on packed ``(T, D)`` tokens laid out as ``layout``."""
        x = self._add_residual(x, layout, self._attn_branch, self.drop_path1)
        return self._add_residual(x, layout, self._ffn_branch, self.drop_path2)

    def forward(self, x: Tensor | list[Tensor], layout: TokenLayout | None = None) -> Tensor | list[Tensor]:
        if layout is not None:
            return self.forward_packed(x, layout)
        if isinstance(x, (list, tuple)):
            layout = TokenLayout.of(x)
            return layout.unpack(self.forward_packed(layout.pack(x), layout))
        batch, n, dim = x.shape
        return self.forward_packed(x.reshape(batch * n, dim), TokenLayout(((batch, n),))).view(batch, n, dim)
