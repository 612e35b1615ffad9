"""RASA: post-training removal of absolute patch position from a frozen backbone's dense features.

``RASAHead`` (``rasa.src.rasa_head``) holds the fitted position directions; ``rasa.train`` fits them;
``rasa.metrics`` measures the remaining position information; ``fold`` turns a head into the backbone's final norm.
"""

from rasa.fold import FoldedLayerNorm, fold, load_folded_backbone, save_folded_backbone
from rasa.src.rasa_head import RASAHead, load_rasa_head

__all__ = ["FoldedLayerNorm", "RASAHead", "fold", "load_folded_backbone", "load_rasa_head", "save_folded_backbone"]
