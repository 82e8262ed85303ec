"""Fused optimizers: one multi-tensor kernel pass per step, regularizers fused in."""

from ._fused import FusedOptimizer
from .adagrad import FusedAdagrad
from .adamw import FusedAdamW
from .rmsprop import FusedRMSprop
from .sgd import FusedSGD

__all__ = ["FusedOptimizer", "FusedAdamW", "FusedSGD", "FusedAdagrad", "FusedRMSprop"]
