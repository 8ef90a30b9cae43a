"""Defences of the coordinator's average against updates that are well-formed but wrong.

Every message passes the format checks (federation/checks.py) first; what is left is a site
that sends a valid model far from what honest training gives, or claims more samples than it
has. Independent defences, each a small piece of plain torch (docs/robustness.md):

- `find_outliers`: each update's L2 distance to the previous global (over the averaged
  weights), per square root of the site's local steps (`distances_per_step`), against the
  median of the other sites' that round. One more than `outlier_factor` times as far is an
  outlier: with `robust_aggregation: none` the coordinator stops the run naming the site; with
  a robust method the update is left out of the round.
- `find_random_updates`: an update whose change relates to nothing (|cosine| below the bound
  with every other site's change, its own change the round before and the federation's last
  step) is random noise, not training; flagged like an outlier (`min_cosine`).
- `capped_weights`: no site gets more than `max_site_weight` of the averaging weight, whatever
  n_train it claims (n_train cannot be verified); from 3 sites on.
- the robust combinations, chosen with `robust_aggregation` (the ideas of Flower's strategies,
  written for state_dicts):
    `norm_clip`     each update's change (update - previous global) is scaled down to the round's
                    median change norm, then weighted-averaged (norm clipping as in DP-FedAvg,
                    with the median as an adaptive bound);
    `trimmed_mean`  per coordinate, the largest and the smallest `trim` values are dropped and
                    the rest averaged, unweighted (Yin et al., 2018; Flower's FedTrimmedAvg);
    `median`        per coordinate, the median of the updates, unweighted (Yin et al., 2018;
                    Flower's FedMedian).

Integer buffers (BatchNorm's num_batches_tracked) are counters: every method keeps the largest,
as the weighted average does.
"""
import math
import statistics

import torch

from federation.aggregate import weighted_average

ROBUST_AGGREGATIONS = ("none", "norm_clip", "trimmed_mean", "median")
MIN_SITES = 3        # below it no method can tell which site is the wrong one
TRIM_FRACTION = 0.2  # trimmed_mean drops this share of the sites at each end (at least one)
# A change is a random direction when all its |cosines| are under 4 standard deviations of a
# random one's (about 6e-5 of random directions exceed it; bench.directions measures both).
RANDOM_COSINE_SIGMAS = 4


def update_distances(previous, states):
    """L2 norm of (state - previous) over every floating-point entry that `previous` has with
    the same shape (entries new this round, e.g. when QAT starts, have nothing to compare to)."""
    return change_norms(update_changes(previous, states))


def change_norms(changes):
    return [change.norm().item() for change in changes]


def update_changes(previous, states):
    """Each state's change (state - previous), flattened to one float64 vector over the entries
    that update_distances measures, in name order (the same in every round: a decoded message
    lists its tensors sorted, a site's own model in module order)."""
    names = sorted(name for name, old in previous.items() if old.is_floating_point())
    changes = []
    for state in states:
        parts = [(state[name].double() - previous[name].double()).flatten() for name in names
                 if name in state and state[name].shape == previous[name].shape]
        changes.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
    return changes


def update_cosines(previous, states):
    """[cosine similarity of each state's change to the coordinate-wise median of the other
    states' changes] (None where either has norm 0: no direction to judge); from MIN_SITES on.
    A description of how far apart sites point (bench.directions), not a check."""
    changes = update_changes(previous, states)
    if len(changes) < MIN_SITES or len({change.numel() for change in changes}) != 1:
        return []
    return median_cosines(changes)


def median_cosines(changes):
    """Each change's cosine with the coordinate-wise median of the others' changes (the
    median: one scaled or flipped change cannot drag it)."""
    return [cosine(change, _coordinate_median(torch.stack(changes[:index] + changes[index + 1:])))
            for index, change in enumerate(changes)]


def cosine(one, other):
    """Cosine similarity of two flat vectors; None where either has norm 0 (no direction)."""
    norms = one.norm() * other.norm()
    return None if norms == 0 else (one @ other.to(one.dtype) / norms).item()


def random_direction_bound(min_cosine, n_weights):
    """The |cosine| under which a change counts as a random direction: `min_cosine`, or, for
    large models, RANDOM_COSINE_SIGMAS standard deviations of a random direction's cosine
    (1 / sqrt(n_weights)) if that is smaller. Small models: a random direction's cosines are
    larger than min_cosine, so noise may pass; it never makes an honest site fail."""
    return min(min_cosine, RANDOM_COSINE_SIGMAS / math.sqrt(n_weights))


def find_random_updates(changes, last_changes, min_cosine, last_step=None):
    """[(index, largest |cosine|, bound)] of the updates whose change is as unrelated to every
    other site's change, to the same site's change the round before and to the federation's
    last step as a random direction is: every |cosine| below random_direction_bound.
    `changes`: this round's (update_changes); `last_changes`: each site's change of the round
    before (None: none yet); `last_step`: the global model's change in the round before
    (None: none yet).

    Not the cosine with the others' direction: honest sites with strongly skewed labels point
    elsewhere than the others, even opposite (cosines to -0.23 measured on Dirichlet 0.1), but
    never at nothing once they have a past: an honest change keeps a clear |cosine| with some
    other site's change, its own last one or the federation's last step, while random noise has
    about 1 / sqrt(n_weights) (0.004 for LeNet) with everything. The federation's last step is
    a reference because it averages the sites' noise away: with small batches (batch 8, many
    noisy Adam steps per round) an honest change of 3 animal sites measured 0.009 and 0.014
    against the other sites' changes and its own last one, but 0.117 and 0.035 against the
    last step. A site's first update is not judged: with nothing of its own to compare with,
    honest round-1 updates of sites holding one or two classes measured as low as 0.010 (3
    sites, animal silhouettes, Dirichlet 0.1). From MIN_SITES sites on; zero changes are not
    judged. `min_cosine` None: no check."""
    if min_cosine is None or len(changes) < MIN_SITES or len({change.numel() for change in changes}) != 1:
        return []
    bound = random_direction_bound(min_cosine, changes[0].numel())
    largest = largest_cosines(changes, last_changes, last_step)
    return [(index, largest[index], bound) for index, change in enumerate(changes)
            if _comparable(last_changes[index], change) and largest[index] is not None and largest[index] < bound]


def largest_cosines(changes, last_changes, last_step=None):
    """Each change's largest |cosine| with another site's change, its own previous one or the
    federation's last step (None for a zero change, or nothing to compare with)."""
    largest = []
    for index, change in enumerate(changes):
        references = _references(changes, index, last_changes[index], last_step)
        largest.append(max(abs(cosine(change, reference)) for reference in references)
                       if change.norm() > 0 and references else None)
    return largest


def _references(changes, index, last, last_step):
    """What changes[index] is compared with: the other sites' non-zero changes, and the same
    site's previous change and the federation's last step where they have the same size (QAT
    adds entries when it starts) and are not zero."""
    references = [other for i, other in enumerate(changes) if i != index and other.norm() > 0]
    references += [earlier for earlier in (last, last_step) if _comparable(earlier, changes[index])]
    return references


def _comparable(last, change):
    return last is not None and last.numel() == change.numel() and last.norm() > 0


def distances_per_step(distances, sizes, batch_size, cap):
    """Each distance over the square root of the local steps per epoch (ceil(n / batch_size))
    of its site's claimed sample count, the claim counting at most as far as the weight cap
    lets it (`credible_sizes`).

    Why: a site with more data takes more steps and moves further. On 10 honest Dirichlet 0.1
    sites (bench.federated_quality's digits and animals, sites of 12 to 1,694 samples) the raw
    distance grew about linearly with the steps, and the largest site was up to 6.3 times the
    others' median: as far as a sign flip x-5, so the run stopped. Per square root of the steps
    (a random walk's spread; Adam's steps on one site's labels move between that and linearly)
    the largest ratio in those runs was 2.6. The square root, not the steps themselves, and the
    cap: a site that claims more samples than it has buys that much more room, and this keeps
    the room small (with the default cap 0.5 a claim counts up to the others' total)."""
    credible = credible_sizes(sizes, cap)
    return [distance / math.sqrt(math.ceil(size / batch_size)) for distance, size in zip(distances, credible)]


def credible_sizes(sizes, cap):
    """Each claimed count, cut to what would give it a share of `cap` of the total beside the
    others' claims (cap 0.5: the others' total); `cap` None or >= 1: the claims as they are."""
    if cap is None or cap >= 1:
        return list(sizes)
    total = sum(sizes)
    # `or size`: a lone site (nothing beside it) keeps its claim
    return [min(size, cap / (1 - cap) * (total - size)) or size for size in sizes]


def find_outliers(distances, factor):
    """[(index, ratio)] of the distances more than `factor` times the median of the others'.

    The reference leaves the site out so that two sites suffice (the median of all would sit
    between an attacker and the one honest site). A reference of 0 (the others did not move)
    judges nothing. `factor` None: no check."""
    if factor is None or len(distances) < 2:
        return []
    found = []
    for index, distance in enumerate(distances):
        reference = statistics.median(distances[:index] + distances[index + 1:])
        if reference > 0 and distance > factor * reference:
            found.append((index, distance / reference))
    return found


def capped_weights(sizes, cap):
    """The averaging weights for claimed sample counts `sizes`, no share above `cap` (a
    fraction of the total; below 1/n it cannot hold and the weights become equal). Only from
    MIN_SITES sites: with two, any cap at or below 0.5 would just make unequal sites equal.

    Shares over the cap are set to it and the rest is shared out in proportion to the sizes,
    repeatedly (water-filling), so the honest sites keep their relative weights. When no share
    is over the cap, `sizes` is returned as it is: the average stays bit for bit what it was."""
    total = sum(sizes)
    if cap is None or len(sizes) < MIN_SITES or max(sizes) <= cap * total:
        return list(sizes)
    cap = max(cap, 1 / len(sizes))
    capped = set()
    while True:
        free = [index for index in range(len(sizes)) if index not in capped]
        room = 1 - cap * len(capped)
        free_total = sum(sizes[index] for index in free)
        shares = {index: room * sizes[index] / free_total for index in free}
        over = {index for index, share in shares.items() if share > cap * (1 + 1e-12)}
        if not over:
            return [cap if index in capped else shares[index] for index in range(len(sizes))]
        capped |= over


def averaging_weights(sizes, method, cap):
    """Each site's weight in what `method` builds from claimed sample counts `sizes`: equal
    under the unweighted per-coordinate methods (trimmed_mean, median), else the capped claims
    (`capped_weights`: `sizes` itself when no share is over the cap)."""
    if method in ("trimmed_mean", "median"):
        return [1] * len(sizes)
    return capped_weights(sizes, cap)


def _per_coordinate(states, combine):
    """Apply `combine(stacked float64 values)` per floating-point entry; counters: the largest."""
    result = {}
    for name, reference in states[0].items():
        stacked = torch.stack([state[name] for state in states])
        if reference.is_floating_point():
            result[name] = combine(stacked.double()).to(reference.dtype)
        else:
            result[name] = stacked.amax(dim=0)
    return result


def weighted_mean(previous, states, weights):
    """`robust_aggregation: none`: the weighted average of the updates."""
    return weighted_average(states, weights)


def norm_clip(previous, states, weights):
    """Every change (state - previous) scaled down to at most the round's median change norm,
    then weighted-averaged. Entries without a previous value are averaged as they are."""
    norms = update_distances(previous, states)
    bound = statistics.median(norms)
    clipped = []
    for state, norm in zip(states, norms):
        scale = 1.0 if norm <= bound else bound / norm
        if scale == 1.0:
            clipped.append(state)
            continue
        clipped.append({name: _scaled_change(previous.get(name), value, scale) for name, value in state.items()})
    return weighted_average(clipped, weights)


def _scaled_change(old, new, scale):
    if old is None or not new.is_floating_point() or old.shape != new.shape:
        return new
    return (old.double() + scale * (new.double() - old.double())).to(new.dtype)


def trimmed_mean(previous, states, weights, fraction=TRIM_FRACTION):
    """Per coordinate: drop the `trim` largest and smallest values (`fraction` of the updates,
    at least one while at least three are left to average), average the rest."""
    trim = min(max(1, int(fraction * len(states))), (len(states) - 1) // 2)
    return _per_coordinate(states, lambda values: values.sort(dim=0).values[trim:len(states) - trim].mean(dim=0))


def _coordinate_median(values):
    """The median along dim 0 (for an even count, the mean of the two middle values)."""
    ordered, n = values.sort(dim=0).values, len(values)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def median(previous, states, weights):
    """Per coordinate: the median (for an even count, the mean of the two middle values)."""
    return _per_coordinate(states, _coordinate_median)


COMBINE = {"none": weighted_mean, "norm_clip": norm_clip, "trimmed_mean": trimmed_mean, "median": median}
assert tuple(COMBINE) == ROBUST_AGGREGATIONS
