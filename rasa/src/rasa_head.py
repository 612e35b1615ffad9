"""The official import path of the RASA head; the layer itself lives in ``franca.layers.rasa_head``."""

from franca.layers.rasa_head import RASAHead, load_rasa_head, rasa_head_state_dict

__all__ = ["RASAHead", "load_rasa_head", "rasa_head_state_dict"]
