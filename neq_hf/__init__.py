"""Neuronal-equilibrium (NEq) freezing for Hugging Face fine-tuning."""

from .callback import NEqTrainerCallback
from .config import NEqConfig
from .engine import NEq
from .freezing import Freezer, RowSparseGradLinear
from .holdout import split_holdout
from .trainer import NEqTrainer
from .units import ARCHITECTURES, ArchitectureSpec, UnsupportedModelError, discover_units, register_architecture

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "Freezer",
    "NEq",
    "NEqConfig",
    "NEqTrainer",
    "NEqTrainerCallback",
    "RowSparseGradLinear",
    "UnsupportedModelError",
    "discover_units",
    "register_architecture",
    "split_holdout",
]
