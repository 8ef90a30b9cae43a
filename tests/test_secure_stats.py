"""Calibration statistics from sums (quant/secure_stats.py) against the exact merge."""
import math

import numpy as np
import pytest
import torch
from torch.ao.quantization.observer import HistogramObserver

from quant import QuantizationError, merge_observer_stats
from quant import secure_stats

pytestmark = pytest.mark.timeout(60)


def site_stats(*tensors):
    """Observer statistics of one site: one HistogramObserver per tensor ('a0', 'a1', ...)."""
    stats = {}
    for index, tensor in enumerate(tensors):
        observer = HistogramObserver(reduce_range=True)
        observer(tensor)
        for name in ("min_val", "max_val", "histogram"):
            stats[f"a{index}.{name}"] = getattr(observer, name).detach().float().clone()
    return stats


def qparams(stats, path="a0"):
    observer = HistogramObserver(reduce_range=True)
    for name in ("min_val", "max_val", "histogram"):
        setattr(observer, name, stats[f"{path}.{name}"].clone())
    scale, zero_point = observer.calculate_qparams()
    return float(scale), int(zero_point)


def secure_merge(sites):
    paths = list(secure_stats.histogram_observers(sites[0]))
    counts = sum(secure_stats.magnitude_counts(stats) for stats in sites)
    grid = secure_stats.grid_from_counts(counts, paths)
    histograms = sum(secure_stats.histograms_on_grid(stats, grid) for stats in sites)
    return grid, secure_stats.stats_from_summed_histograms(histograms, grid, sites[0])


@pytest.fixture
def three_sites():
    generator = torch.Generator().manual_seed(1)
    relu = [torch.relu(torch.randn(4000, generator=generator) * scale) for scale in (0.7, 1.3, 2.9)]
    signed = [torch.randn(3000, generator=generator) * scale + shift
              for scale, shift in ((0.2, 0.1), (0.5, -0.3), (0.05, 0.0))]
    return [site_stats(a, b) for a, b in zip(relu, signed)]


def test_grid_holds_every_site_and_is_at_most_twice_the_federations_range(three_sites):
    paths = list(secure_stats.histogram_observers(three_sites[0]))
    grid = secure_stats.grid_from_counts(sum(secure_stats.magnitude_counts(s) for s in three_sites), paths)
    for path in paths:
        low = min(float(s[f"{path}.min_val"]) for s in three_sites)
        high = max(float(s[f"{path}.max_val"]) for s in three_sites)
        grid_low, grid_high = grid[path]
        assert grid_low <= low and grid_high >= high
        assert grid_high <= 2 * high and (low >= 0 or grid_low >= 2 * low)
        # Powers of two (or 0): no site's own extreme is in the grid.
        for edge in (grid_low, grid_high):
            assert edge == 0 or math.log2(abs(edge)).is_integer()
    assert grid["a0"][0] == 0.0  # ReLU outputs: no negative mass


def test_summed_histograms_give_the_exact_merges_range_and_qparams(three_sites):
    grid, merged = secure_merge(three_sites)
    exact = merge_observer_stats(three_sites)
    for path in ("a0", "a1"):
        width = (grid[path][1] - grid[path][0]) / secure_stats.FINE_BINS
        assert float(merged[f"{path}.min_val"]) == pytest.approx(float(exact[f"{path}.min_val"]), abs=width)
        assert float(merged[f"{path}.max_val"]) == pytest.approx(float(exact[f"{path}.max_val"]), abs=width)
        assert merged[f"{path}.histogram"].shape == exact[f"{path}.histogram"].shape
        assert float(merged[f"{path}.histogram"].sum()) == pytest.approx(float(exact[f"{path}.histogram"].sum()), rel=1e-6)
        scale, zero_point = qparams(merged, path)
        exact_scale, exact_zero_point = qparams(exact, path)
        assert scale == pytest.approx(exact_scale, rel=0.01)
        assert abs(zero_point - exact_zero_point) <= 1


def test_each_site_sends_only_sums_of_counts_on_a_common_grid(three_sites):
    grid, _ = secure_merge(three_sites)
    vectors = [secure_stats.histograms_on_grid(stats, grid) for stats in three_sites]
    assert {len(vector) for vector in vectors} == {2 * secure_stats.FINE_BINS}
    for stats, vector in zip(three_sites, vectors):  # mass preserved, nothing else travels
        assert vector.sum() == pytest.approx(float(stats["a0.histogram"].sum() + stats["a1.histogram"].sum()))


def test_an_observer_that_saw_nothing_at_one_site_is_fine(three_sites):
    empty = {key: value.clone() for key, value in three_sites[0].items()}
    empty["a1.min_val"], empty["a1.max_val"] = torch.tensor(math.inf), torch.tensor(-math.inf)
    empty["a1.histogram"] = torch.zeros_like(empty["a1.histogram"])
    _, merged = secure_merge([empty, *three_sites[1:]])
    exact = merge_observer_stats([empty, *three_sites[1:]])
    assert qparams(merged, "a1")[0] == pytest.approx(qparams(exact, "a1")[0], rel=0.01)


def test_range_only_observers_are_refused():
    stats = {"a.min_val": torch.tensor(0.0), "a.max_val": torch.tensor(1.0)}
    with pytest.raises(QuantizationError, match="not a histogram"):
        secure_stats.magnitude_counts(stats)


def test_all_mass_at_zero_gives_a_tiny_range_around_zero():
    stats = site_stats(torch.zeros(100))
    _, merged = secure_merge([stats, stats])
    assert float(merged["a0.min_val"]) == 0.0 and 0 < float(merged["a0.max_val"]) < 1e-6
    assert np.isclose(float(merged["a0.histogram"].sum()), 200)
