"""A site's validation split: held out of its training data (never its test set), stratified by
label and seeded, so that the same config and data give the same split at every run.

Each class gives its share of validation examples (`fraction` of its count, the remainders
rounded so that the total is round(fraction * n)); a class keeps at least one training
example, so no class the site has is missing from its training.
"""
import math

import torch

from inputs.errors import InputError


def stratified_split(labels, fraction, seed):
    """(train indices, validation indices), each a sorted list, for per-sample `labels` (a 1-D
    integer tensor). `fraction` 0 gives every index to training."""
    labels = torch.as_tensor(labels)
    by_class = {int(label): (labels == label).nonzero().flatten() for label in torch.unique(labels)}
    quotas = _quotas({label: len(indices) for label, indices in by_class.items()}, fraction)
    generator = torch.Generator().manual_seed(seed)
    validation = []
    for label, indices in by_class.items():  # torch.unique sorts: the same order every run
        shuffled = indices[torch.randperm(len(indices), generator=generator)]
        validation += shuffled[:quotas[label]].tolist()
    held_out = set(validation)
    train = [index for index in range(len(labels)) if index not in held_out]
    return train, sorted(validation)


def _quotas(counts, fraction):
    """label -> validation examples: largest remainders of fraction * count, summing to
    round(fraction * n) where every class can keep one training example."""
    exact = {label: fraction * count for label, count in counts.items()}
    quotas = {label: min(math.floor(share), counts[label] - 1) for label, share in exact.items()}
    target = round(fraction * sum(counts.values()))
    by_remainder = sorted(exact, key=lambda label: (quotas[label] - exact[label], label))
    for label in by_remainder:
        if sum(quotas.values()) >= target:
            break
        if quotas[label] < counts[label] - 1:
            quotas[label] += 1
    return quotas


def split_for_validation(labels, fraction, seed, config_path):
    """stratified_split, refused (naming config.yml and validation_fraction) when it leaves no
    validation example: the train set is too small for `fraction`."""
    train, validation = stratified_split(labels, fraction, seed)
    if fraction > 0 and not validation:
        raise InputError(config_path, f"{fraction:g} of the train set's {len(labels)} samples is no "
                         "validation example (each class keeps one for training); use more data or "
                         "validation_fraction: 0", key="validation_fraction")
    return train, validation
