"""Continual-learning methods (what each adds to a frozen ViT, what it trains per task, its task hooks) and the
statistics-based classifiers, both chosen by name from registries (pure PyTorch)."""

from models.continual.base import METHODS, ContinualMethod, TaskContext, create_method, register_method
from models.continual.classifiers import CLASSIFIERS, create_classifier

__all__ = ["CLASSIFIERS", "METHODS", "ContinualMethod", "TaskContext", "create_classifier", "create_method",
           "register_method"]
