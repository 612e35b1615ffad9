"""torch.hub entry points: ``torch.hub.load("valeoai/Franca" or a local checkout, "franca_vitl14", ...)``."""

from franca.hub.backbones import franca_vitb14, franca_vitg14, franca_vitl14

dependencies = ["torch"]

__all__ = ["franca_vitb14", "franca_vitg14", "franca_vitl14"]
