"""The RASA head: a chain of linear position read-outs whose spans are removed from patch tokens.

Each read-out is a bias-free ``nn.Linear(D, k)`` (``k = pos_out_dim`` ∈ {1, 2}). Removing it means projecting
the token ``x ∈ R^D`` onto the span of the read-out's rows and subtracting that part:

* k = 1, row ``v``:  ``x_pos = (x·v / v·v) v``
* k = 2, rows ``r, c``: Gram-Schmidt ``u_r = r/|r|``, ``u_c ∝ c/|c| − (c/|c|·u_r) u_r`` (unit norm), then
  ``x_pos = (x·u_r) u_r + (x·u_c) u_c``

and ``x ← x − x_pos``. The already-fitted read-outs live in ``pre_pos_layers`` (applied in order); ``pos_pred`` is
the read-out being fitted (its output goes through ``pos_out_act_layer``, a sigmoid by default). Because every
step is an orthogonal projection, the whole head is the linear map ``x ↦ x @ debias_matrix()``.

State-dict keys (the official head file format): ``pos_pred.weight`` (k×D) and ``pre_pos_layers.<i>.weight``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from franca.utils.io import load_tensor_file

_ACTIVATIONS: dict[str | None, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
    "none": nn.Identity,
    None: nn.Identity,
}
# Prefixes a head's keys may carry: DDP wrappers, the hub attribute, the Lightning module attribute.
_HEAD_KEY_PREFIXES = ("module.", "rasa_head.", "head.")


def _position_basis(weight: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (k×D) of the span of the rows of a k×D read-out weight (k ∈ {1, 2}), Gram-Schmidt order."""
    if weight.shape[0] == 1:
        return weight / weight.norm()
    u_r = weight[0] / weight[0].norm()
    c = weight[1] / weight[1].norm()
    u_c = c - torch.dot(c, u_r) * u_r
    return torch.stack([u_r, u_c / u_c.norm()])


class RASAHead(nn.Module):
    """Removes absolute position from patch tokens (B, N, D) by iterated orthogonal projections."""

    def __init__(
        self, input_dim: int, n_pos_layers: int, pos_out_dim: int = 2, pos_out_act_layer: str | None = "sigmoid"
    ) -> None:
        super().__init__()
        if pos_out_dim not in (1, 2):
            raise ValueError(f"pos_out_dim must be 1 or 2, got {pos_out_dim}")
        if pos_out_act_layer not in _ACTIVATIONS:
            raise ValueError(f"pos_out_act_layer must be one of 'sigmoid', 'tanh' or None, got {pos_out_act_layer!r}")
        self.input_dim = input_dim
        self.pos_out_dim = pos_out_dim
        self.pos_out_act_layer = _ACTIVATIONS[pos_out_act_layer]()
        self.pos_pred = nn.Linear(input_dim, pos_out_dim, bias=False)
        self.pre_pos_layers = nn.ModuleList(nn.Linear(input_dim, pos_out_dim, bias=False) for _ in range(n_pos_layers))

    @property
    def n_pos_layers(self) -> int:
        """Number of read-outs already fitted and removed before ``pos_pred``."""
        return len(self.pre_pos_layers)

    def forward(
        self, x: torch.Tensor, use_pos_pred: bool = True, return_pos_info: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Remove every ``pre_pos_layers`` span (and ``pos_pred``'s when ``use_pos_pred``) from ``x`` (…, D).

        With ``return_pos_info`` returns ``(x_pos, x_debiased)`` where ``x_pos`` is the part removed by the last step
        (zeros when no step ran).
        """
        x_pos = torch.zeros_like(x)
        weights = [layer.weight for layer in self.pre_pos_layers]
        if use_pos_pred:
            weights.append(self.pos_pred.weight)
        for weight in weights:
            x_pos, x = self.decompose_pos(x, weight)
        if return_pos_info:
            return x_pos, x
        return x

    def forward_pos_pred(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted normalised position ``act(x @ pos_pred.weightᵀ)``: (…, D) → (…, pos_out_dim)."""
        return self.pos_out_act_layer(self.pos_pred(x))

    def decompose_pos(self, x: torch.Tensor, ll_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split ``x`` (…, D) into its projection on the span of ``ll_weight``'s rows and the orthogonal rest."""
        if ll_weight.shape != (self.pos_out_dim, self.input_dim):
            raise ValueError(
                f"read-out weight must have shape ({self.pos_out_dim}, {self.input_dim}), got {tuple(ll_weight.shape)}"
            )
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"RASA head expects tokens of width {self.input_dim}, got {x.shape[-1]}")
        basis = _position_basis(ll_weight)
        x_pos = (x @ basis.T) @ basis
        return x_pos, x - x_pos

    @torch.no_grad()
    def debias_matrix(self, use_pos_pred: bool = True) -> torch.Tensor:
        """The D×D matrix ``M`` with ``forward(x, use_pos_pred) == x @ M``: the product of the ``I − UᵀU`` steps."""
        weights = [layer.weight for layer in self.pre_pos_layers]
        if use_pos_pred:
            weights.append(self.pos_pred.weight)
        matrix = torch.eye(self.input_dim, dtype=self.pos_pred.weight.dtype, device=self.pos_pred.weight.device)
        for weight in weights:
            basis = _position_basis(weight)
            matrix = matrix - (matrix @ basis.T) @ basis
        return matrix

    @torch.no_grad()
    def append_pos_pred(self) -> None:
        """Freeze the fitted ``pos_pred``, move it to the end of ``pre_pos_layers`` and start a freshly initialised one."""
        self.pre_pos_layers.append(self.pos_pred.requires_grad_(False))
        self.pos_pred = nn.Linear(self.input_dim, self.pos_out_dim, bias=False).to(self.pre_pos_layers[-1].weight)

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE between ``forward_pos_pred(x)`` and the normalised positions ``target`` (same leading shape, …×k)."""
        return F.mse_loss(self.forward_pos_pred(x), target)


def rasa_head_state_dict(obj: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The head's own keys from a head file, a hub file or a Lightning checkpoint (``state_dict`` with ``head.``)."""
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    head: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        stripped = key
        for prefix in _HEAD_KEY_PREFIXES:
            stripped = stripped.removeprefix(prefix)
        if stripped == "pos_pred.weight" or stripped.startswith("pre_pos_layers."):
            head[stripped] = value
    if "pos_pred.weight" not in head:
        raise KeyError(
            "RASA head file has no 'pos_pred.weight' key (expected pos_pred.weight, pre_pos_layers.<i>.weight)"
        )
    return head


def load_rasa_head(
    source: str | os.PathLike | Mapping[str, object],
    input_dim: int | None = None,
    pos_out_act_layer: str | None = "sigmoid",
) -> RASAHead:
    """Build a ``RASAHead`` from a head file (``.pth`` or ``.safetensors``) or a state dict; width and layer count
    come from its keys.

    ``input_dim`` (e.g. the backbone's ``embed_dim``), when given, must match the file's width.
    """
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"RASA head file not found: {source}")
        source = load_tensor_file(source)
    state_dict = rasa_head_state_dict(source)
    pos_out_dim, width = state_dict["pos_pred.weight"].shape
    if input_dim is not None and width != input_dim:
        raise ValueError(f"RASA head width {width} does not match the backbone width {input_dim}")
    indices = sorted(int(key.split(".")[1]) for key in state_dict if key.startswith("pre_pos_layers."))
    if indices != list(range(len(indices))):
        raise KeyError(f"RASA head pre_pos_layers indices must be 0..n-1, found {indices}")
    head = RASAHead(width, len(indices), pos_out_dim=pos_out_dim, pos_out_act_layer=pos_out_act_layer)
    head.load_state_dict(state_dict, strict=True)
    return head
