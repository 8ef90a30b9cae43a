"""How a site's messages reach the coordinator: whole, or as sums only (secure_aggregation).

The states run one flow whichever channel the config picks: `send(state, memo)` sends this
site's message under a memo; at the coordinator `gather(state, memo)` returns what arrived
under it, in the form the channel's `aggregator` takes. The state passed in is the
transport (states.FederatedState: the only code that calls FeatureCloud's send methods).

| | PlainChannel | SecureChannel |
|---|---|---|
| a site sends | the Site's message bytes | a SecureSite contribution through the controller's SMPC |
| the coordinator gets | [(sender, bytes)] in client order | the controller's one aggregate (`Sum`) |
| aggregator | Coordinator | SecureCoordinator |

Two exchanges take one more step under secure aggregation (federation/secure.py): with the
`summary` every site sends its sample counts as a sum (`counts`; `global_0` carries the
totals back), and before its `calibration` histograms the sites agree on a common grid
(`calibration_range` summed, `calibration_grid` broadcast). With `dp.noise: distributed` a
round's training is DP-SGD steps on the union before the `update`: per step a secure sum of
noisy gradients (`dp_sum_<r>_<s>`) and the coordinator's next model (`dp_model_<r>_<s>`).
"""
import json
import time

from federation.coordinator import Coordinator
from federation.messages import memo_kind
from federation.secure import SecureCoordinator, SecureSite, Sum


def open_channel(site, n_sites, is_coordinator):
    """The channel config.yml asks for (`secure_aggregation`)."""
    if site.config.secure_aggregation:
        return SecureChannel(site, n_sites, is_coordinator)
    return PlainChannel(site, is_coordinator)


class PlainChannel:
    """Every site's message reaches the coordinator whole; the Coordinator decodes each."""
    secure = None   # no SecureSite: metrics.json reports no secure sums
    log_suffix = ""

    def __init__(self, site, is_coordinator):
        self.site = site
        self.aggregator = Coordinator(site) if is_coordinator else None
        self._messages = {"summary": site.summary_message, "update": site.train_round,
                          "test": site.evaluate_global, "calibration": site.calibration_message,
                          "results": site.results_message}

    def send(self, state, memo):
        state.send_to_coordinator(memo, self._messages[memo_kind(memo)]())

    def gather(self, state, memo):
        return state.gather_pieces(memo)

    def first_global(self, state):
        return self.aggregator.first_global()

    def receive_first_global(self, meta):
        """Nothing to keep: the sites weight nothing by the federation's totals."""


class SecureChannel:
    """Only sums of the sites' data reach the coordinator; the SecureCoordinator reads them.
    Plain are only the shapes in `summary` (no site's data) and the coordinator's broadcasts."""
    log_suffix = " (secure sums)"

    def __init__(self, site, n_sites, is_coordinator):
        self.site = site
        self.secure = SecureSite(site, n_sites)
        self.aggregator = SecureCoordinator(Coordinator(site), n_sites) if is_coordinator else None

    def send(self, state, memo):
        if memo == "summary":
            state.send_to_coordinator(memo, self.secure.summary_message())
            memo = "counts"
        elif memo == "calibration":
            self._agree_on_grid(state)
        elif memo_kind(memo) == "update" and self.secure.distributed_dp:
            self._train_on_noisy_sums(state, memo)
        self._contribute(state, memo)

    def gather(self, state, memo):
        if memo == "summary":
            return state.gather_pieces(memo)
        return Sum(memo, state.gather_sum(memo))

    def first_global(self, state):
        """The initial model, carrying the federation's totals the sites weight updates by."""
        return self.aggregator.first_global(self.gather(state, "counts"))

    def receive_first_global(self, meta):
        self.secure.receive_totals(meta)

    def _contribution(self, memo):
        """This site's share of the sum under `memo`."""
        secure, kind = self.secure, memo_kind(memo)
        per_round = {"update": secure.update, "test": secure.test, "dp_sum": secure.dp_sum}
        if kind in per_round:
            return per_round[kind](memo)
        return {"counts": secure.counts, "calibration_range": secure.calibration_range,
                "calibration": secure.calibration, "results": secure.results}[kind]()

    def _contribute(self, state, memo):
        """Send this site's share; record its JSON size against the plain message's."""
        contribution = self._contribution(memo)
        started = time.perf_counter()
        size = len(json.dumps(contribution.vector))
        state.send_sum(memo, contribution.vector, contribution.exponent)
        self.site.record_bytes(memo, size)
        self.secure.record(contribution, size, time.perf_counter() - started)

    def _train_on_noisy_sums(self, state, update_memo):
        """dp.noise distributed: the round's DP-SGD steps on the union of the sites' data. Each
        step every site sends its clipped gradient sum plus its share of the noise; the
        coordinator steps on the sum and every site loads the model it broadcasts."""
        round_number = int(update_memo.rsplit("_", 1)[1])
        for step in range(1, self.secure.dp_plan.steps_per_round + 1):
            summed, model = f"dp_sum_{round_number}_{step}", f"dp_model_{round_number}_{step}"
            self._contribute(state, summed)
            if state.is_coordinator:
                state.broadcast(model, self.aggregator.step_on_noisy_sum(self.gather(state, summed), round_number))
            self.site.receive_global(*state.await_broadcast(model))

    def _agree_on_grid(self, state):
        """Magnitude counts summed give a range holding every site's activations (no site's
        own minimum or maximum leaves it); the coordinator broadcasts the grid on it."""
        self._contribute(state, "calibration_range")
        if state.is_coordinator:
            state.broadcast("calibration_grid", self.aggregator.calibration_grid(
                self.gather(state, "calibration_range"), self.site.own_stats))
        self.secure.receive_grid(*state.await_broadcast("calibration_grid"))
