"""Server-side aggregation: how the coordinator turns the sites' average into the next global.

`fedavg` takes the weighted average as the next global model (so does `scaffold`, whose
control variates are averaged alongside the weights and used by the sites). `fedavgm` (Hsu et al., 2019)
and `fedadam` (Reddi et al., 2021, "Adaptive Federated Optimization") treat
`average - previous global` as a pseudo-gradient and run momentum or Adam on it at the
coordinator; that state lives across rounds in one `ServerOptimizer` object.

Only trainable parameters go through the optimizer: BatchNorm running statistics are
statistics, not weights, and integer buffers are counters; both keep their averaged value.
"""
import torch

from inputs.config import AGGREGATIONS
# Defaults per aggregation, chosen on the sample data with bench/federated_quality.py.
DEFAULT_LEARNING_RATES = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.03, "scaffold": 1.0}


class ServerOptimizer:
    """The coordinator's optimizer; `step(previous, averaged, parameter_names)` -> next global."""

    def __init__(self, aggregation="fedavg", learning_rate=None, momentum=0.3, betas=(0.9, 0.99),
                 epsilon=1e-3):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        self.aggregation = aggregation
        self.learning_rate = DEFAULT_LEARNING_RATES[aggregation] if learning_rate is None else learning_rate
        self.momentum = momentum
        self.betas = tuple(betas)
        self.epsilon = epsilon
        self.state = {}  # parameter name -> momentum buffer, or (Adam's first, second moment)

    @classmethod
    def from_config(cls, config):
        return cls(config.aggregation, config.server_learning_rate, config.server_momentum,
                   config.server_betas, config.server_epsilon)

    def step(self, previous, averaged, parameter_names):
        """The next global state: `averaged` with every name in `parameter_names` replaced by
        previous + the optimizer's step along (averaged - previous)."""
        if self.aggregation in ("fedavg", "scaffold"):  # scaffold's work is at the sites
            return dict(averaged)
        next_global = dict(averaged)
        for name in parameter_names:
            old = previous.get(name)
            if old is None or old.shape != averaged[name].shape:
                continue  # a parameter new this round (QAT just started): nothing to step from
            delta = averaged[name].double() - old.double()
            step = self._momentum_step(name, delta) if self.aggregation == "fedavgm" \
                else self._adam_step(name, delta)
            next_global[name] = (old.double() + step).to(averaged[name].dtype)
        return next_global

    def _momentum_step(self, name, delta):
        velocity = self.state.get(name)
        velocity = delta if velocity is None else self.momentum * velocity + delta
        self.state[name] = velocity
        return self.learning_rate * velocity

    def _adam_step(self, name, delta):
        # Reddi et al.'s Algorithm 2 (FedAdam): no bias correction; epsilon (their tau)
        # bounds the step where the pseudo-gradient has been ~0.
        beta1, beta2 = self.betas
        first, second = self.state.get(name, (torch.zeros_like(delta), torch.zeros_like(delta)))
        first = beta1 * first + (1 - beta1) * delta
        second = beta2 * second + (1 - beta2) * delta.square()
        self.state[name] = (first, second)
        return self.learning_rate * first / (second.sqrt() + self.epsilon)
