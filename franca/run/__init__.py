"""Submitit launchers: ``python -m franca.run.train ...`` (see :mod:`franca.run.train`)."""
