"""The DINO projection head (DINOv2 baseline, ``dino.MRL: false``) and the pieces the Matryoshka head shares.

``DINOHead``: ``x → MLP → L2-normalise → WeightNormLinear → prototype logits``.
``WeightNormLinear``: a bias-free weight-normalised linear layer ``y = (x vᵀ) · diag(g / ‖v‖)`` whose parameters
keep the names of the old ``torch.nn.utils.weight_norm`` (``weight_g`` K×1, ``weight_v`` K×in), so official
checkpoints load and save with identical keys.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

# Key suffixes written by ``torch.nn.utils.parametrizations.weight_norm`` (the newer weight-norm API).
_PARAMETRIZED_NAMES = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype when autocast is on for ``x``'s device, else ``x``'s dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _WeightNormLinearFunction(torch.autograd.Function):
    """``y = (x @ vᵀ) · s`` with ``s = g / ‖v‖`` (per row of v), forward and backward without forming g·v/‖v‖.

    Backward, with ``M = gyᵀ x`` (K × in) and the row dots ``r_k = M_k · v_k`` (= Σ_b gy_bk (x_b · v_k)):
    ``∂x = (gy · s) v``, ``∂g_k = r_k / ‖v_k‖``, ``∂v_k = s_k (M_k - r_k v_k / ‖v_k‖²)``. Only x, v and the
    norms are kept for backward (no rows × K tensor); M is the one K × in buffer written, updated in place.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight_v: Tensor, weight_g: Tensor, dtype: torch.dtype) -> Tensor:
        norms = torch.linalg.vector_norm(weight_v.float(), dim=1, keepdim=True)
        scale = (weight_g.float() / norms).view(-1)
        x2d, v = x.reshape(-1, x.shape[-1]).to(dtype), weight_v.to(dtype)
        ctx.save_for_backward(x2d, v, weight_v, norms, scale)
        ctx.input_shape, ctx.g_dtype = x.shape, weight_g.dtype
        with torch.autocast(x.device.type, enabled=False):
            out = torch.mm(x2d, v.t()).mul_(scale.to(dtype))
        return out.view(*x.shape[:-1], weight_v.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2d, v, weight_v, norms, scale = ctx.saved_tensors
        grad_out = grad_out.reshape(-1, v.shape[0]).to(v.dtype)
        grad_x = grad_v = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_out * scale.to(v.dtype), v).view(ctx.input_shape).to(x2d.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_m = torch.mm(grad_out.t(), x2d).to(weight_v.dtype)
            row_dots = torch.einsum("kd,kd->k", grad_m, weight_v).unsqueeze(1)
            grad_g = (row_dots / norms).to(ctx.g_dtype)
            grad_v = grad_m.addcmul_(weight_v, row_dots / norms.square(), value=-1).mul_(scale.unsqueeze(1))
        return grad_x, grad_v, grad_g, None


class WeightNormLinear(nn.Module):
    """Bias-free weight-normalised linear layer: ``y = (x @ vᵀ) · (g / ‖v‖)`` with ``‖v‖`` the norm of each row.

    For at most ``in_features`` rows the normalised matrix ``g · v / ‖v‖`` is not materialised, in forward or
    backward (see ``_WeightNormLinearFunction``): the product uses ``v`` directly and the per-prototype scale
    ``g / ‖v‖`` multiplies the (rows × K) output in place; for more rows the K × in weight is formed (the
    smaller of the two passes). Under autocast the products run in the autocast dtype.
    ``weight_g`` starts at 1 and ``weight_v`` as an ``nn.Linear`` weight, like ``weight_norm(nn.Linear)``
    followed by ``weight_g.fill_(1)`` in the reference.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        """The effective weight ``g · v / ‖v‖`` (K × in); materialised, so only for inspection or export."""
        return self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (..., in) → (..., K). With more rows than input features the K × in weight ``g · v / ‖v‖`` is
        the smaller tensor to write (forward and backward), so it is formed, as the reference's weight norm
        does; with fewer rows the (rows × K) output is scaled instead (see ``_WeightNormLinearFunction``)."""
        if x.numel() > x.shape[-1] * self.in_features:
            return F.linear(x, torch._weight_norm(self.weight_v, self.weight_g, 0))  # the fused weight-norm kernel
        return _WeightNormLinearFunction.apply(x, self.weight_v, self.weight_g, _compute_dtype(x))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Accept files written with the parametrisation API (``parametrizations.weight.original0/1``).
        for new_suffix, old_suffix in _PARAMETRIZED_NAMES.items():
            if prefix + new_suffix in state_dict and prefix + old_suffix not in state_dict:
                state_dict[prefix + old_suffix] = state_dict.pop(prefix + new_suffix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def build_mlp(
    nlayers: int,
    in_dim: int,
    bottleneck_dim: int,
    hidden_dim: int,
    use_bn: bool = False,
    bias: bool = True,
    activate_output: bool = False,
) -> nn.Module:
    """``nlayers`` linear layers ``in → hidden (→ hidden)* → bottleneck`` with [BatchNorm +] GELU between them.

    ``nlayers == 1`` gives a single ``nn.Linear``. ``activate_output`` appends [BatchNorm +] GELU after the
    bottleneck layer (the Matryoshka head does this; the DINOv2 head does not). Sequential indices, hence
    state-dict keys, are those of the reference (``0, 2, 4`` for 3 layers without BatchNorm).
    """
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    widths = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out, bias=bias))
        if index < nlayers - 1 or activate_output:
            if use_bn:
                layers.append(nn.BatchNorm1d(width_out))
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def init_linear_weights(module: nn.Module, std: float = 0.02) -> None:
    """Head initialisation: ``nn.Linear`` weights ~ truncated N(0, std²) (official: 0.02), biases 0
    (prototype layers untouched)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """DINOv2 head: ``logits = WeightNormLinear(normalize(MLP(x)))``, x (..., in_dim) → (..., out_dim).

    The L2 normalisation uses ``eps = 1e-6`` in float16 and ``1e-12`` otherwise. Keys: ``mlp.*``,
    ``last_layer.weight_g`` (out_dim × 1), ``last_layer.weight_v`` (out_dim × bottleneck_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.mlp = build_mlp(max(nlayers, 1), in_dim, bottleneck_dim, hidden_dim, use_bn=use_bn, bias=mlp_bias)
        self.mlp.apply(partial(init_linear_weights, std=init_std))
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(x, dim=-1, p=2, eps=eps))
