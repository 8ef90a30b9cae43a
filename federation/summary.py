"""Federation-wide figures the coordinator computes from what the sites report (plain data)."""
from federation.checks import SiteMismatchError


def check_sites_fit(summaries):
    """`summaries`: [(sender, {input_shape, n_classes, ...})], the coordinator's first."""
    reference_sender, reference = summaries[0]
    for sender, summary in summaries[1:]:
        if summary["input_shape"] != reference["input_shape"]:
            raise SiteMismatchError(
                f"site {sender}'s inputs have shape {tuple(summary['input_shape'])}, but site "
                f"{reference_sender}'s (the coordinator's) have {tuple(reference['input_shape'])}",
                sender, "input shape differs")


def federation_label_counts(summaries, n_outputs, weights=None):
    """logit_adjustment: the federation's training label counts from the sites' own. Each site
    must send one count per class score of the model (the same model everywhere: `n_outputs`,
    the coordinator's), adding up to the n_train it claims.

    `weights`: each site's share of the averaging weight where it is not its n_train (a site
    over max_site_weight, or an unweighted robust method): then the counts are N * sum_i
    share_i * p_i(y), the label prior of the model the federation averages, so a site that
    claims a huge n_train of one class moves the prior no more than its capped weight allows.
    Without: the plain sums."""
    sizes = []
    for sender, summary in summaries:
        counts = summary.get("label_counts")
        if counts is None or len(counts) != n_outputs or sum(counts) != summary["n_train"]:
            shown = "none" if counts is None else f"{len(counts)} counts adding up to {sum(counts)}"
            raise SiteMismatchError(
                f"site {sender} sent label_counts with {shown}: expected {n_outputs} counts (one per class "
                f"score of the model) adding up to its n_train {summary['n_train']} (logit_adjustment is set)",
                sender, "bad label counts")
        sizes.append(summary["n_train"])
    if weights is None or list(weights) == sizes:
        return [sum(column) for column in zip(*(summary["label_counts"] for _, summary in summaries))]
    shares = [weight / sum(weights) for weight in weights]
    total = sum(sizes)
    return [round(total * sum(share * summary["label_counts"][label] / size
                              for share, size, (_, summary) in zip(shares, sizes, summaries)))
            for label in range(n_outputs)]


def weighted_mean(reports, key, weight_key):
    """Mean of `key` over the reports, weighted by `weight_key` (e.g. n_test)."""
    total = sum(report[weight_key] for report in reports)
    return sum(report[key] * report[weight_key] for report in reports) / total


def federation_round(round_number, updates, tests):
    """One row of the federation-wide table: train figures weighted by n_train, test by n_test,
    validation by n_validation (over the sites with a validation split; null when none has)."""
    validated = [test for test in tests if test["n_validation"] > 0]
    return {"round": round_number,
            "train_loss": weighted_mean(updates, "train_loss", "n_train"),
            "train_accuracy": weighted_mean(updates, "train_accuracy", "n_train"),
            "test_loss": weighted_mean(tests, "test_loss", "n_test"),
            "test_accuracy": weighted_mean(tests, "test_accuracy", "n_test"),
            "validation_loss": weighted_mean(validated, "validation_loss", "n_validation") if validated else None,
            "validation_accuracy":
                weighted_mean(validated, "validation_accuracy", "n_validation") if validated else None}


def check_validation_figures(sender, test):
    """A site's test report has validation figures exactly when it has a validation split."""
    has_split = test["n_validation"] > 0
    if has_split != (test["validation_loss"] is not None) or has_split != (test["validation_accuracy"] is not None):
        raise SiteMismatchError(f"site {sender} sent n_validation {test['n_validation']} with validation "
                                f"figures {test['validation_loss']!r}, {test['validation_accuracy']!r}: figures "
                                "must be numbers with a validation split and null without", sender,
                                "bad test report")


def federation_results(reports):
    """fp32 and int8 figures over all sites' test sets; `reports` are the sites' results."""
    figures = {"n_sites": len(reports),
               "n_train": sum(report["n_train"] for report in reports),
               "n_test": sum(report["n_test"] for report in reports)}
    for precision in ("fp32", "int8"):
        per_site = [{**report[precision], "n_test": report["n_test"]} for report in reports]
        figures[precision] = {"accuracy": weighted_mean(per_site, "accuracy", "n_test"),
                              "loss": weighted_mean(per_site, "loss", "n_test")}
    figures["artifacts"] = federation_artifacts(reports)
    return figures


def federation_artifacts(reports):
    """Each int8 file over all sites' test sets (accuracy weighted by n_test), with its size and
    SHA-256, the same at every site (Coordinator.final checks that first)."""
    rows = []
    for index, artifact in enumerate(reports[0]["artifacts"]):
        per_site = [{**report["artifacts"][index], "n_test": report["n_test"]} for report in reports]
        rows.append({"file": artifact["file"], "size_bytes": artifact["size_bytes"], "sha256": artifact["sha256"],
                     "digest": artifact["digest"], "accuracy": weighted_mean(per_site, "accuracy", "n_test")})
    return rows
