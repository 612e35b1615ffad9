"""Evaluations of frozen backbones: k-NN, linear probes, logistic regression, Matryoshka truncation, PCA pictures.

Each is a module with a command line (``python -m franca.eval.<name>``); they share one feature
extraction, :func:`franca.eval.features.extract_features`. The command modules are not imported
here so that ``python -m`` runs them without a second import.
"""

from franca.eval.features import extract_features

__all__ = ["extract_features"]
