"""Franca losses: Matryoshka DINO / iBOT self-distillation, KoLeo, and the Sinkhorn-Knopp teacher targets."""

from franca.loss.koleo_loss import KoLeoLoss  # noqa: F401
from franca.loss.mrl_dino_loss import MRLDINOLoss  # noqa: F401
from franca.loss.mrl_ibot_patch_loss import MRLiBOTPatchLoss  # noqa: F401
from franca.loss.sinkhorn_knopp import sinkhorn_knopp  # noqa: F401
