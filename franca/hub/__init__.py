"""Pretrained backbones (torch.hub entry points) and the checkpoint reader."""

from franca.hub.backbones import Weights, franca_vitb14, franca_vitg14, franca_vitl14
from franca.hub.loading import CheckpointError, backbone_state_dict, load_backbone_weights, read_checkpoint

__all__ = [
    "CheckpointError",
    "Weights",
    "backbone_state_dict",
    "franca_vitb14",
    "franca_vitg14",
    "franca_vitl14",
    "load_backbone_weights",
    "read_checkpoint",
]
