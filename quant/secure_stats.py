"""Calibration statistics from sums only (secure aggregation): no site's own minimum or maximum
leaves it, yet the merged statistics are as good as `merge_observer_stats`' exact merge.

Two sums, each of them element-wise over the sites (plain numpy; the sums themselves are made
by FeatureCloud's SMPC):

1. `magnitude_counts(stats)`: per histogram observer, how much of the site's histogram mass
   lies in each power-of-two magnitude bucket, separately for negative and positive values.
   Summed over the sites it is a coarse histogram of the federation's activations;
   `grid_from_counts` takes from it a range [low, high] that holds every site's data and is at
   most 2x wider than the federation's own range on either side (2^k >= |extreme| > 2^(k-1)).
   No site's extreme is in it, only a power of two above the federation's.
2. `histograms_on_grid(stats, grid)`: each site's histogram re-binned onto FINE_BINS bins on
   [low, high] (uniform mass within a source bin, as the exact merge does). Summed, it is the
   federation's histogram; `stats_from_summed_histograms` trims it to the occupied bins (the
   federation's range, to a fine bin: at most (high - low) / FINE_BINS, i.e. <= 1/4096 of the
   federation's largest magnitude) and re-bins that onto the observer's own bins
   (HistogramObserver: 2048), which is what the exact merge produces from exact extremes.

Only histogram observers (min_val, max_val, histogram) can be merged this way; an observer
of the data that keeps only a range is refused: a minimum or maximum is not a sum. Weight
observers (PT2E's per-channel min/max) are not in the statistics at all: they see only the
global weights, the same at every site (`Int8Recipe.calibrate`).
"""
import math
from collections import defaultdict

import numpy as np
import torch

from .errors import QuantizationError
from .stats import rebinned

# Power-of-two buckets 2^K_MIN .. 2^K_MAX for the magnitude of activations.
K_MIN, K_MAX = -32, 31
N_BUCKETS = K_MAX - K_MIN + 1
FINE_BINS = 8192  # 4x the HistogramObserver's 2048 on a range at most 2x the federation's
_STAT_NAMES = ("histogram", "max_val", "min_val")


def histogram_observers(stats: dict) -> dict:
    """path -> {min_val, max_val, histogram} for every observer, in a fixed order; refuses
    observers without a histogram (only a range cannot be summed)."""
    grouped = defaultdict(dict)
    for key, value in stats.items():
        path, _, name = key.rpartition(".")
        grouped[path][name] = value
    for path, observer in grouped.items():
        if set(observer) != set(_STAT_NAMES):
            raise QuantizationError(
                f"secure aggregation: observer '{path}' keeps {sorted(observer)}, not a histogram; "
                "only histogram observers (HistogramObserver, the default of every backend) can be "
                "calibrated from sums (a minimum or maximum is not a sum)")
        if observer["min_val"].numel() != 1:
            raise QuantizationError(f"secure aggregation: observer '{path}' is per channel; only "
                                    "per-tensor histogram observers can be calibrated from sums")
    return {path: grouped[path] for path in sorted(grouped)}


def _seen(observer) -> bool:
    low, high = float(observer["min_val"]), float(observer["max_val"])
    return math.isfinite(low) and math.isfinite(high) and float(observer["histogram"].sum()) > 0


def _edges(observer) -> np.ndarray:
    low, high = float(observer["min_val"]), float(observer["max_val"])
    return np.linspace(low, high, observer["histogram"].numel() + 1)


def bucket_of(magnitude: float) -> int:
    """The index (0..N_BUCKETS-1) of the smallest power of two 2^k >= magnitude > 0."""
    if magnitude > 2.0 ** K_MAX:
        raise QuantizationError(f"secure aggregation: an activation of magnitude {magnitude:.3g} "
                                f"exceeds 2^{K_MAX}, the largest range the secure calibration handles")
    k = math.ceil(math.log2(magnitude)) if magnitude > 0 else K_MIN
    return min(max(k, K_MIN), K_MAX) - K_MIN


def magnitude_counts(stats: dict) -> np.ndarray:
    """Per observer 2 x N_BUCKETS counts (negative side, positive side): the site's histogram
    mass by the power-of-two bucket of its bins' outer edges. One flat float64 vector."""
    observers = histogram_observers(stats)
    counts = np.zeros((len(observers), 2, N_BUCKETS))
    for index, observer in enumerate(observers.values()):
        if not _seen(observer):
            continue
        histogram = observer["histogram"].double().numpy()
        edges = _edges(observer)
        for count, left, right in zip(histogram, edges[:-1], edges[1:]):
            if count <= 0:
                continue
            if left < 0:
                counts[index, 0, bucket_of(-left)] += count
            if right > 0:
                counts[index, 1, bucket_of(right)] += count
            if left >= 0 and right <= 0:  # all mass at exactly 0
                counts[index, 1, 0] += count
    return counts.ravel()


def grid_from_counts(summed: np.ndarray, paths: list) -> dict:
    """path -> [low, high] from the summed magnitude counts: the power of two above the
    federation's largest negative and positive magnitude (0 where there is no mass on a side)."""
    summed = np.asarray(summed, dtype=np.float64).reshape(len(paths), 2, N_BUCKETS)
    grid = {}
    for path, (negative, positive) in zip(paths, summed):
        # A count below 1e-3 is fixed-point dust, not mass (counts are sample counts).
        low = -2.0 ** (np.nonzero(negative > 1e-3)[0].max() + K_MIN) if (negative > 1e-3).any() else 0.0
        high = 2.0 ** (np.nonzero(positive > 1e-3)[0].max() + K_MIN) if (positive > 1e-3).any() else 0.0
        if high <= low:  # no mass anywhere, or all at 0: a tiny range around 0
            low, high = -(2.0 ** K_MIN), 2.0 ** K_MIN
        grid[path] = [float(low), float(high)]
    return grid


def histograms_on_grid(stats: dict, grid: dict, fine_bins: int = FINE_BINS) -> np.ndarray:
    """This site's histograms re-binned onto `fine_bins` bins on each observer's [low, high];
    one flat float64 vector (observers in sorted order)."""
    observers = histogram_observers(stats)
    if sorted(grid) != list(observers):
        raise QuantizationError("secure aggregation: the calibration grid does not name this "
                                "site's observers")
    parts = []
    for path, observer in observers.items():
        low, high = grid[path]
        edges = np.linspace(low, high, fine_bins + 1)
        if not _seen(observer):
            parts.append(np.zeros(fine_bins))
            continue
        site_low, site_high = float(observer["min_val"]), float(observer["max_val"])
        if site_low < low or site_high > high:
            raise QuantizationError(f"secure aggregation: observer '{path}' saw [{site_low}, "
                                    f"{site_high}], outside the federation's grid [{low}, {high}]")
        parts.append(rebinned(observer["histogram"].double().numpy(), site_low, site_high, edges))
    return np.concatenate(parts) if parts else np.zeros(0)


def stats_from_summed_histograms(summed: np.ndarray, grid: dict, template: dict,
                                 fine_bins: int = FINE_BINS, dust: float = 1e-3) -> dict:
    """Observer statistics (the keys and bin counts of `template`, this site's own) from the
    summed fine histograms: trimmed to the occupied bins, re-binned onto the observer's bins."""
    observers = histogram_observers(template)
    summed = np.asarray(summed, dtype=np.float64).reshape(len(observers), fine_bins)
    merged = {}
    for (path, observer), fine in zip(observers.items(), summed):
        low, high = grid[path]
        fine = np.where(fine > dust, fine, 0.0)  # fixed-point dust is no mass
        occupied = np.nonzero(fine)[0]
        if occupied.size == 0:  # no site saw data: keep the untouched observer's values
            merged.update({f"{path}.{name}": observer[name].clone() for name in _STAT_NAMES})
            continue
        width = (high - low) / fine_bins
        first, last = int(occupied[0]), int(occupied[-1])
        new_low, new_high = low + first * width, low + (last + 1) * width
        if low == 0.0 and first == 0:
            new_low = 0.0  # keep an exact 0 (ReLU outputs): the exact merge has it too
        bins = observer["histogram"].numel()
        histogram = rebinned(fine[first:last + 1], new_low, new_high, np.linspace(new_low, new_high, bins + 1))
        merged[f"{path}.histogram"] = torch.from_numpy(histogram).to(torch.float32).contiguous()
        merged[f"{path}.min_val"] = torch.tensor(new_low, dtype=torch.float32)
        merged[f"{path}.max_val"] = torch.tensor(new_high, dtype=torch.float32)
    return merged
