"""Reading and validating one site's inputs: config.yml, the model file, datasets, train_function.

Everything here raises `InputError`, which names the file (and key) that is wrong, so the
site that has the problem can report it through the FeatureCloud status.
"""
from inputs.errors import InputError

__all__ = ["InputError"]
