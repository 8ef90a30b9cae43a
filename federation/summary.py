"""Federation-wide figures the coordinator computes from what the sites report (plain data)."""


class SiteMismatchError(ValueError):
    """The sites' data do not fit together, or a site sent malformed figures; names the site."""


_NUMBER = (int, float)
# What each report must hold: key -> accepted types (bool is excluded from numbers below).
REPORT_FIELDS = {
    "summary": {"n_train": int, "n_test": int, "input_shape": list, "n_classes": int},
    "update": {"n_train": int, "train_loss": _NUMBER, "train_accuracy": _NUMBER},
    "test": {"n_test": int, "test_loss": _NUMBER, "test_accuracy": _NUMBER},
    "results": {"n_train": int, "n_test": int, "fp32": dict, "int8": dict},
    "figures": {"accuracy": _NUMBER, "loss": _NUMBER},
}


def check_report(kind, meta, sender):
    """Raise SiteMismatchError unless `meta` has the fields a `kind` report needs, sensibly typed.

    Figures from other sites feed the weighted means; a count that is not a positive integer or
    a figure that is not a number would silently skew them.
    """
    for key, types in REPORT_FIELDS[kind].items():
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            raise SiteMismatchError(f"site {sender} sent a {kind} report whose '{key}' is {value!r}")
        if key.startswith("n_") and value < 1:
            raise SiteMismatchError(f"site {sender} sent a {kind} report whose '{key}' is {value!r}")
    if kind == "results":
        for precision in ("fp32", "int8"):
            check_report("figures", meta[precision], sender)


def check_sites_fit(summaries):
    """`summaries`: [(sender, {input_shape, n_classes, ...})], the coordinator's first."""
    reference_sender, reference = summaries[0]
    for sender, summary in summaries[1:]:
        if summary["input_shape"] != reference["input_shape"]:
            raise SiteMismatchError(
                f"site {sender}'s inputs have shape {tuple(summary['input_shape'])}, but site "
                f"{reference_sender}'s (the coordinator's) have {tuple(reference['input_shape'])}")


def weighted_mean(reports, key, weight_key):
    """Mean of `key` over the reports, weighted by `weight_key` (e.g. n_test)."""
    total = sum(report[weight_key] for report in reports)
    return sum(report[key] * report[weight_key] for report in reports) / total


def federation_round(round_number, updates, tests):
    """One row of the federation-wide table: train figures weighted by n_train, test by n_test."""
    return {"round": round_number,
            "train_loss": weighted_mean(updates, "train_loss", "n_train"),
            "train_accuracy": weighted_mean(updates, "train_accuracy", "n_train"),
            "test_loss": weighted_mean(tests, "test_loss", "n_test"),
            "test_accuracy": weighted_mean(tests, "test_accuracy", "n_test")}


def federation_results(reports):
    """fp32 and int8 figures over all sites' test sets; `reports` are the sites' results."""
    figures = {"n_sites": len(reports),
               "n_train": sum(report["n_train"] for report in reports),
               "n_test": sum(report["n_test"] for report in reports)}
    for precision in ("fp32", "int8"):
        per_site = [{**report[precision], "n_test": report["n_test"]} for report in reports]
        figures[precision] = {"accuracy": weighted_mean(per_site, "accuracy", "n_test"),
                              "loss": weighted_mean(per_site, "loss", "n_test")}
    return figures
