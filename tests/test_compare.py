"""fp32 vs int8, written one way: the report, the status page and the testbed's table agree."""
import math

import pytest

from outputs import compare
from testbed.report import metrics_table
from webui import render_page


@pytest.mark.parametrize("fp32, int8, size, latency", [
    (4096, 1024, "4.0x smaller", "4.0x faster"),
    (181000, 52000, "3.5x smaller", "3.5x faster"),
    (1.2, 3.6, "3.0x larger", "3.0x slower"),
    (2.0, 2.0, "1.0x smaller", "1.0x faster"),
])
def test_ratios_say_how_many_times_with_one_decimal(fp32, int8, size, latency):
    assert compare.size(fp32, int8) == size
    assert compare.latency(fp32, int8) == latency


@pytest.mark.parametrize("fp32, int8", [
    (None, 1.0), (1.0, None), (0, 1.0), (1.0, 0), (-1.0, 1.0), (True, 1.0), ("2", 1.0),
    (math.nan, 1.0), (math.inf, 1.0),
])
def test_undefined_ratios_are_none(fp32, int8):
    assert compare.size(fp32, int8) is None and compare.latency(fp32, int8) is None


def test_accuracy_in_points_and_loss_as_a_difference():
    assert compare.point_change(0.955, 0.952) == "-0.30 pp"
    assert compare.point_change(0.95, 0.96) == "+1.00 pp"
    assert compare.difference(0.15, 0.16) == "+0.0100"
    assert compare.point_change(None, 0.9) is None and compare.difference(0.1, None) is None


def test_status_page_and_testbed_table_show_the_same_comparison():
    site = {"fp32": {"accuracy": 0.9712, "loss": 0.1, "size_bytes": 243712, "latency_ms": 0.67},
            "int8": {"accuracy": 0.9700, "loss": 0.12, "size_bytes": 74752, "latency_ms": 0.46}}
    page = render_page({"finished": True, "results": {"site": site, "federation": {}}})
    table = metrics_table("client_1", site)
    for text in ("3.3x smaller", "1.5x faster", "-0.12 pp"):
        assert text in page and text in table
