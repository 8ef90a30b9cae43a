"""Everything the coordinator does, in one object that the states and the benchmarks share.

It receives what the sites sent as (sender, bytes) pieces, in client order, and returns the
bytes to broadcast: decoding and checking each site's message (through the site's Codec),
weighted averaging, merging observer statistics, the aggregation rule's step, SCAFFOLD's
control variates, and the federation-wide figures.
"""
from federation.aggregate import weighted_average
from federation.messages import Codec, ModelMessage
from federation.rules import rule_from_config
from federation.summary import check_sites_fit, federation_results, federation_round
from quant import merge_calibration


class Coordinator:
    def __init__(self, site):
        """`site`: the coordinator's own Site (its codec, model schema and parameter names)."""
        self.site = site
        self.rule = rule_from_config(site.config)
        self.rounds = []         # federation-wide figures per round
        self._update_meta = []   # this round's update figures, for its row

    @property
    def codec(self) -> Codec:
        return self.site.codec

    def check_summaries(self, pieces):
        summaries = [(sender, self.codec.decode_report(sender, data, "summary")) for sender, data in pieces]
        check_sites_fit(summaries)

    def first_global(self):
        return self.codec.encode_model(self.site.local_message())

    def aggregate(self, pieces):
        """The next global model from the sites' updates: weighted average, merged observer
        statistics, averaged control variates, then the rule's step from the previous global."""
        updates = [self.codec.decode_model(sender, data, report="update") for sender, data in pieces]
        self._update_meta = [update.meta for update in updates]
        sizes = [update.meta["n_train"] for update in updates]
        previous = ModelMessage.split(self.codec.last_global)
        weights = self.rule.step(previous.weights, weighted_average([u.weights for u in updates], sizes),
                                 self.site.parameter_names())
        controls = weighted_average([u.controls for u in updates], sizes) if updates[0].controls else {}
        observers = merge_calibration([u.observers for u in updates])
        latest = self.rounds[-1]["test_accuracy"] if self.rounds else None  # for the status pages
        return self.codec.encode_model(ModelMessage(weights, observers, controls,
                                                    {"federation_accuracy": latest}))

    def record_round(self, round_number, pieces):
        """The round's federation-wide row from the sites' test figures."""
        tests = [self.codec.decode_report(sender, data, "test") for sender, data in pieces]
        row = federation_round(round_number, self._update_meta, tests)
        self.rounds.append(row)
        return row

    def merge_calibration(self, pieces, own_stats):
        """The federation's observer statistics from every site's."""
        stats = [self.codec.decode_stats(sender, data, own_stats) for sender, data in pieces]
        return self.codec.encode_stats(merge_calibration(stats))

    def final(self, pieces):
        """The federation-wide rounds and fp32/int8 figures every site writes."""
        reports = [self.codec.decode_report(sender, data, "results") for sender, data in pieces]
        return self.codec.encode_report({"rounds": self.rounds, "figures": federation_results(reports)})
