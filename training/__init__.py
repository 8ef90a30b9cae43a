"""Plain PyTorch training for one site: seeding, data loaders, the default train loop, evaluation.

Nothing here knows about FeatureCloud. `training/loop.py` holds `train`, the default training
function and the template for a user's own `train_function` file.
"""
from training.loop import Evaluation, evaluate, make_optimizer, train
from training.reproducibility import make_loader, seed_everything

__all__ = ["Evaluation", "evaluate", "make_loader", "make_optimizer", "seed_everything", "train"]
