"""What the FeatureCloud controller does with a payload it pulled from a site.

Routing by the status' `destination`, SMPC sums, and the byte counts the benchmarks report.
"""
import json
import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from testbed.site import SiteFailure


def memo_of(status):
    """The memo as delivered: a status without memo delivers the literal string 'None'."""
    memo = status.get("memo")
    return "None" if memo is None else str(memo)


def _to_fixed(value, scale):
    """JSON numbers (nested lists allowed) to fixed-point ints, as the controller does."""
    if isinstance(value, list) and all(type(item) is float for item in value):
        return [int(item * scale) for item in value]  # the apps' flat vectors, fast
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise TypeError(f"SMPC payloads must be numbers or nested lists of numbers, "
                        f"found {type(value).__name__}")
    if isinstance(value, list):
        return [_to_fixed(item, scale) for item in value]
    return int(value * scale)


def _structure(value):
    """The nesting of a payload (flat lists: their length), to compare payloads' shapes."""
    if isinstance(value, list):
        if all(isinstance(item, int) for item in value):
            return len(value)
        return tuple(_structure(item) for item in value)
    return None


def _from_fixed(value, scale):
    if isinstance(value, list):
        return [_from_fixed(item, scale) for item in value]
    return value / scale


# Shares live in the integers modulo 2^64 (additive sharing over a ring, as in Google's
# SecAgg): every share is uniform whatever the value, and the signed sum (|sum| < 2^63, which
# the apps' fixed-point exponents guarantee) is recovered exactly. numpy's uint64 arithmetic
# wraps modulo 2^64 by itself.
MODULUS = 2 ** 64


def _flat(value):
    if isinstance(value, list):
        for item in value:
            yield from _flat(item)
    else:
        yield value


def _shaped(values, like):
    """`values` (an iterator) in the nesting of `like`."""
    if isinstance(like, list):
        return [_shaped(values, item) for item in like]
    return next(values)


def make_shares(fixed, n_shares):
    """Additive secret shares (uint64 arrays) of the integers `fixed` modulo 2^64: n_shares - 1
    uniformly random vectors and one that completes the sum. Any n_shares - 1 of them are
    uniformly random, whatever the values: one share alone says nothing about them."""
    try:
        values = np.array(fixed, dtype=np.int64).view(np.uint64)
    except OverflowError:
        raise ValueError("an SMPC value is beyond the 64-bit fixed-point range") from None
    shares = [_random_vector(len(values)) for _ in range(n_shares - 1)]
    last = values.copy()
    for share in shares:
        last -= share
    return shares + [last]


def _random_vector(n):
    """n integers uniform in [0, 2^64) from the OS's CSPRNG."""
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64).copy()


def smpc_sum(payloads, exponent, shares_out=None):
    """Element-wise sum of JSON payloads in fixed point with `exponent` decimal digits, as the
    controller computes it: each site's numbers become fixed-point integers and are split into
    one additive share per site (modulo 2^64); share-holder j sums the j-th shares of every
    site; the share-holders' sums combined give the sum, and only the sum is decoded.
    `shares_out`, a list, receives every site's shares (tests look at them)."""
    scale = 10 ** int(exponent)
    fixed = [_to_fixed(json.loads(payload), scale) for payload in payloads]
    if len({_structure(values) for values in fixed}) != 1:
        raise ValueError("SMPC payloads differ in shape")
    n = len(payloads)
    site_shares = [make_shares(list(_flat(values)), n) for values in fixed]
    if shares_out is not None:
        shares_out.extend([share.tolist() for share in shares] for shares in site_shares)
    # Share-holder j only ever sees the j-th share of each site.
    holder_sums = [sum(shares[j] for shares in site_shares) for j in range(n)]
    combined = sum(holder_sums).view(np.int64)  # the only decoded values
    total = _shaped(iter(combined.tolist()), fixed[0])
    return json.dumps(_from_fixed(total, scale)).encode()


def fixed_point_sum(payloads, exponent):
    """What smpc_sum delivers for flat lists of numbers, computed without the shares (they
    cancel exactly): the same fixed-point conversion and integer sum, vectorized. For the
    benchmarks' in-process federations, which sum hundreds of model-sized vectors per run
    (distributed DP: one per step); the testbed's controller keeps smpc_sum."""
    scale = 10 ** int(exponent)
    fixed = [np.asarray(json.loads(payload), dtype=np.float64) for payload in payloads]
    if len({array.shape for array in fixed}) != 1 or fixed[0].ndim != 1:
        raise ValueError("SMPC payloads differ in shape (or are not flat lists)")
    scaled = [array * scale for array in fixed]
    if not all(np.isfinite(array).all() and (np.abs(array) < 2 ** 63).all() for array in scaled):
        raise ValueError("an SMPC value is not finite or beyond the 64-bit fixed-point range")
    # int(value * scale) truncates toward zero, as astype does; the bound keeps sums < 2^63.
    total = sum(np.trunc(array).astype(np.int64) for array in scaled)
    return json.dumps([value / scale for value in total.tolist()]).encode()


@dataclass(frozen=True)
class Delivery:
    """One delivery a relay_filter asks for instead of the payload it was given: `sender` is
    who the receiver is told sent it (None: the real sender; a 1-based site index; or any id
    string, e.g. one that belongs to no site), `memo` the memo (None: the real one). A filter
    that returns [] drops the payload; [d, d] delivers it twice."""
    payload: bytes
    sender: object = None
    memo: str | None = None


class Relay:
    """Routes payloads between sites; sites[0] is the coordinator."""

    def __init__(self, sites, relay_filter=None):
        self.sites = sites
        self.coordinator = sites[0]
        self.sites_by_id = {site.id: site for site in sites}
        self.relay_filter = relay_filter
        self.bytes_by_memo = defaultdict(int)
        self.smpc_pending = {}  # memo -> {site index: payload}
        # What each site received: {receiver index: [{memo, sender, smpc_aggregate, bytes}]}.
        self.received = defaultdict(list)

    @property
    def bytes_relayed(self):
        return sum(self.bytes_by_memo.values())

    def route(self, sender, status, payload):
        if status.get("dp"):
            raise SiteFailure(sender, "differential privacy (status 'dp') is not supported "
                                      "by the testbed")
        memo = memo_of(status)
        if status.get("smpc"):
            self._collect_smpc(sender, status["smpc"], memo, payload)
            return
        for receiver in self._receivers(sender, status.get("destination")):
            for delivery in self._deliveries(sender, receiver, memo, payload):
                self._deliver_as(delivery, sender, receiver, memo)

    def _receivers(self, sender, destination):
        if destination is None and sender is self.coordinator:
            # A broadcast: the coordinator already kept its own copy (send_to_self).
            return [site for site in self.sites if site is not sender]
        if destination is None:
            return [self.coordinator]
        receiver = self.sites_by_id.get(destination)
        if receiver is None:
            raise SiteFailure(sender, f"destination {destination!r} is not a client id of this run")
        return [receiver]

    def _deliveries(self, sender, receiver, memo, payload):
        """What the relay_filter makes of one payload: bytes (delivered as sent) or a list of
        Delivery."""
        if self.relay_filter is None:
            return [Delivery(payload)]
        replaced = self.relay_filter(sender.index, receiver.index, memo, payload)
        if isinstance(replaced, bytes):
            return [Delivery(replaced)]
        if isinstance(replaced, list) and all(isinstance(d, Delivery) for d in replaced):
            return replaced
        raise TypeError(f"relay_filter must return bytes or a list of Delivery, returned "
                        f"{type(replaced).__name__}")

    def _filtered(self, sender, receiver, memo, payload):
        deliveries = self._deliveries(sender, receiver, memo, payload)
        if len(deliveries) != 1 or deliveries[0].sender is not None or deliveries[0].memo is not None:
            raise TypeError("relay_filter: SMPC contributions can only be replaced by bytes")
        return deliveries[0].payload

    def _deliver_as(self, delivery, sender, receiver, memo):
        claimed = delivery.sender
        if claimed is None:
            sender_id, sender_name = sender.id, sender.name
        elif isinstance(claimed, int):
            claimed_site = self.sites[claimed - 1]
            sender_id, sender_name = claimed_site.id, f"{claimed_site.name} (sent by {sender.name})"
        else:
            sender_id, sender_name = str(claimed), f"{str(claimed)!r} (sent by {sender.name})"
        self._deliver(sender_id, receiver, delivery.memo or memo, delivery.payload, sender_name)

    def _deliver(self, sender_id, receiver, memo, payload, sender_name=None, smpc_aggregate=False):
        receiver.post_data(payload, sender_id, memo, sender_name)
        self.bytes_by_memo[memo] += len(payload)
        sender = next((site.index for site in self.sites if site.id == sender_id), None)
        self.received[receiver.index].append({"memo": memo, "sender": sender, "smpc_aggregate": smpc_aggregate,
                                              "bytes": len(payload)})

    def _collect_smpc(self, sender, smpc, memo, payload):
        if smpc.get("operation", "add") != "add" or smpc.get("serialization", "json") != "json":
            raise SiteFailure(sender, f"SMPC {smpc.get('operation')}/{smpc.get('serialization')} "
                                      f"is not supported by the testbed (only add/json)")
        pending = self.smpc_pending.setdefault(memo, {})
        if sender.index in pending:
            raise SiteFailure(sender, f"sent two SMPC payloads for memo {memo!r}")
        pending[sender.index] = self._filtered(sender, self.coordinator, memo, payload)
        if len(pending) < len(self.sites):
            return
        del self.smpc_pending[memo]
        try:
            total = smpc_sum([pending[index] for index in sorted(pending)],
                             smpc.get("exponent", 8))
        except (ValueError, TypeError, OverflowError) as error:  # OverflowError: int(inf)
            raise SiteFailure(sender, f"SMPC payloads for memo {memo!r} cannot be summed: "
                                      f"{error}") from error
        # The aggregate comes from no single site; it is posted in the coordinator's name.
        self._deliver(self.coordinator.id, self.coordinator, memo, total, "the controller (SMPC sum)",
                      smpc_aggregate=True)
