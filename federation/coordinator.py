"""Everything the coordinator does, in one object that the states and the benchmarks share.

It receives what the sites sent as (sender, bytes) pieces, in client order, and returns the
bytes to broadcast: decoding and checking each site's message (through the site's Codec),
weighted averaging, merging observer statistics, the aggregation rule's step, SCAFFOLD's
control variates, and the federation-wide figures.

Before averaging, the updates pass the robustness defences of `federation.robust`: the outlier
check on each update's distance to the previous global, the cap on any one site's share of the
weight, and the robust combination config.yml asks for (docs/robustness.md).
"""
from federation import robust
from federation.aggregate import weighted_average
from federation.checks import SiteMismatchError, UpdateError
from federation.messages import Codec, ModelMessage
from federation.rules import rule_from_config
from federation.selection import ModelSelection
from federation.summary import (check_sites_fit, check_validation_figures, federation_label_counts, federation_results,
                                federation_round)
from quant import merge_calibration


class Coordinator:
    def __init__(self, site):
        """`site`: the coordinator's own Site (its codec, model schema and parameter names)."""
        self.site = site
        self.rule = rule_from_config(site.config)
        config = site.config
        # QAT's float warm-up rounds have another model structure than the one converted.
        first_candidate = config.qat_schedule()[0] if config.quant_type == "qat" else 1
        self.selection = ModelSelection(config.keep, config.patience, config.max_iter, first_candidate)
        self.rounds = []         # federation-wide figures per round
        self._update_meta = []   # this round's update figures, for its row
        self.sites = {}          # sender -> what it claimed and what weight it got (the `final` message)
        self._last_changes = {}  # sender -> its update's change of the round before (the noise check)
        self._last_step = None   # the global model's change the round before (the noise check)
        self.label_counts = None  # logit_adjustment: the federation's training label counts

    @property
    def codec(self) -> Codec:
        return self.site.codec

    def check_summaries(self, pieces):
        _check_senders(pieces, "summary")
        summaries = [(sender, self.codec.decode_report(sender, data, "summary")) for sender, data in pieces]
        check_sites_fit(summaries)
        config = self.site.config
        method = config.robust_aggregation
        if method != "none" and len(pieces) < robust.MIN_SITES:
            raise SiteMismatchError(
                f"robust_aggregation: {method} needs at least {robust.MIN_SITES} sites, this federation "
                f"has {len(pieces)}: with fewer, no method can tell which site is wrong (use none)")
        if config.logit_adjustment > 0:
            # The label prior of the model the federation builds: the averaging's own weights.
            weights = robust.averaging_weights([summary["n_train"] for _, summary in summaries], method,
                                               config.max_site_weight)
            self.label_counts = federation_label_counts(summaries, self.site.inputs.n_outputs, weights)

    def first_global(self):
        """The initial model (with logit_adjustment: carrying the federation's label counts)."""
        meta = {"label_counts": self.label_counts} if self.label_counts is not None else {}
        return self.codec.encode_model(self.site.local_message(**meta))

    def aggregate(self, pieces):
        """The next global model from the sites' updates: outliers found, weights capped, the
        updates combined (weighted average, or the robust method), merged observer statistics,
        averaged control variates, then the rule's step from the previous global."""
        _check_senders(pieces, "update")
        senders = [sender for sender, _ in pieces]
        updates = [self.codec.decode_model(sender, data, report="update") for sender, data in pieces]
        self._update_meta = [update.meta for update in updates]
        previous = ModelMessage.split(self.codec.last_global)
        kept = self._without_outliers(previous.weights, senders, updates)
        config = self.site.config
        kept_updates = [updates[index] for index in kept]
        shares = robust.capped_weights([update.meta["n_train"] for update in kept_updates], config.max_site_weight)
        self._record_weights(senders, updates, kept)
        combined = robust.COMBINE[config.robust_aggregation](previous.weights, [u.weights for u in kept_updates], shares)
        weights = self.rule.step(previous.weights, combined, self.site.parameter_names())
        self._remember_step(previous.weights, weights)
        controls = weighted_average([u.controls for u in kept_updates], shares) if updates[0].controls else {}
        observers = merge_calibration([u.observers for u in kept_updates])
        latest = self.rounds[-1]["test_accuracy"] if self.rounds else None  # for the status pages
        return self.codec.encode_model(ModelMessage(weights, observers, controls,
                                                    {"federation_accuracy": latest}))

    def _without_outliers(self, previous, senders, updates):
        """Indices of the updates to combine. An update too far from the previous global for
        the steps its n_train gives (robust.distances_per_step, robust.find_outliers) or as
        unrelated to every other update as random noise (robust.find_random_updates) stops the
        run naming its site; with a robust method it is left out of this round instead."""
        config = self.site.config
        changes = robust.update_changes(previous, [update.weights for update in updates])
        batch_size = config.dp["batch_size"] if config.dp else config.batch_size
        distances = robust.distances_per_step(robust.change_norms(changes), [u.meta["n_train"] for u in updates],
                                              batch_size, config.max_site_weight)
        far = robust.find_outliers(distances, config.outlier_factor)
        noise = self._find_random_updates(senders, changes)
        if config.robust_aggregation == "none" and (far or noise):
            raise _outlier_error(config, senders, far, noise)
        round_number = len(self.rounds) + 1
        excluded = sorted({flagged[0] for flagged in far + noise})
        for index in excluded:
            self._site_row(senders[index], updates[index])["excluded_rounds"].append(round_number)
        return [index for index in range(len(updates)) if index not in excluded]

    def _find_random_updates(self, senders, changes):
        """robust.find_random_updates, remembering each site's change for the next round
        (in float32: half the memory, and a cosine needs no more precision)."""
        if self.site.config.min_cosine is None:
            return []
        last = [self._last_changes.get(sender) for sender in senders]
        self._last_changes = {sender: change.float() for sender, change in zip(senders, changes)}
        return robust.find_random_updates(changes, last, self.site.config.min_cosine, self._last_step)

    def _remember_step(self, previous, next_global):
        """The global model's change this round, for the next round's random-direction check."""
        if self.site.config.min_cosine is not None:
            self._last_step = robust.update_changes(previous, [next_global])[0].float()

    def _site_row(self, sender, update):
        row = self.sites.setdefault(str(sender), {"id": sender, "n_train": 0, "weight": 0.0, "excluded_rounds": []})
        row["n_train"] = update.meta["n_train"]
        return row

    def _record_weights(self, senders, updates, kept):
        """Each site's claimed n_train and its share of this round's averaging weight."""
        config = self.site.config
        weights = robust.averaging_weights([updates[index].meta["n_train"] for index in kept],
                                           config.robust_aggregation, config.max_site_weight)
        share_of = dict(zip(kept, (weight / sum(weights) for weight in weights)))
        for index, (sender, update) in enumerate(zip(senders, updates)):
            self._site_row(sender, update)["weight"] = share_of.get(index, 0.0)

    def record_round(self, round_number, pieces):
        """The round's federation-wide row from the sites' test figures."""
        _check_senders(pieces, "test")
        tests = [self.codec.decode_report(sender, data, "test") for sender, data in pieces]
        for (sender, _), test in zip(pieces, tests):
            check_validation_figures(sender, test)
        row = federation_round(round_number, self._update_meta, tests)
        self.rounds.append(row)
        return row

    def decide(self):
        """After record_round: which round's model is kept so far and whether training stops
        (federation.selection), as the `round_<r>` message every site follows."""
        row = self.rounds[-1]
        decision = self.selection.observe(row["round"], row["validation_loss"])
        return self.codec.encode_report(decision.to_meta())

    def merge_calibration(self, pieces, own_stats):
        """The federation's observer statistics from every site's."""
        _check_senders(pieces, "calibration")
        stats = [self.codec.decode_stats(sender, data, own_stats) for sender, data in pieces]
        return self.codec.encode_stats(merge_calibration(stats))

    def final(self, pieces):
        """The federation-wide rounds and fp32/int8 figures every site writes, and what each site
        claimed (n_train) and got (its share of the averaging weight, rounds it was left out of)."""
        _check_senders(pieces, "results")
        reports = [self.codec.decode_report(sender, data, "results") for sender, data in pieces]
        for sender, report in zip((sender for sender, _ in pieces), reports):
            _check_same_files(self.site.artifacts, report["artifacts"], sender)
        return self.codec.encode_report({"rounds": self.rounds, "figures": federation_results(reports),
                                         "sites": list(self.sites.values())})


def _check_senders(pieces, kind):
    """One message per site: a site whose message arrived twice would be counted twice."""
    seen = set()
    for sender, _ in pieces:
        if sender in seen:
            raise UpdateError(f"site {sender} sent more than one '{kind}' message this round", sender,
                              f"duplicate {kind}")
        seen.add(sender)


def _outlier_error(config, senders, far, noise):
    """The UpdateError naming the first site flagged: too far first (the stronger evidence),
    else random noise."""
    if far:
        index, ratio = far[0]
        return UpdateError(
            f"update from site {senders[index]} is an outlier: {ratio:.1f} times as far from the "
            f"previous global model as the other sites' updates (median; per square root of the "
            f"local steps its n_train gives), more than outlier_factor "
            f"{config.outlier_factor:g}; a hostile or broken site (or, if its data really differ that "
            f"much, raise outlier_factor or set robust_aggregation)",
            senders[index], "outlier update")
    index, largest, bound = noise[0]
    return UpdateError(
        f"update from site {senders[index]} looks like random noise: its change from the previous "
        f"global model has no cosine similarity above {bound:.3f} in absolute value with any other "
        f"site's change, its own change the round before or the federation's last step (largest "
        f"{largest:.3f}; min_cosine {config.min_cosine:g}); a hostile or broken site (to turn the check off: set "
        f"min_cosine: null in config.yml)",
        senders[index], "update looks like noise")


def _check_same_files(own, theirs, sender):
    """Every site must end with the very same int8 files: their digests (quant.model_digest:
    the SHA-256, canonical for TorchScript) say so in one line."""
    mine = {row["file"]: row["digest"] for row in own}
    other = {row["file"]: row["digest"] for row in theirs}
    if set(mine) != set(other):
        raise SiteMismatchError(f"site {sender} wrote the int8 files {sorted(other)}, the coordinator "
                                f"{sorted(mine)}", sender, "other int8 files")
    for name, digest in mine.items():
        if other[name] != digest:
            raise SiteMismatchError(
                f"site {sender}'s {name} differs from the coordinator's (digest {other[name][:12]}... "
                f"vs {digest[:12]}...): the sites do not hold the same int8 model", sender,
                "int8 model differs")
