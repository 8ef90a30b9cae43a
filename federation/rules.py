"""Aggregation rules: how the coordinator turns the sites' weighted average into the next global.

Every rule treats `average - previous global` as a pseudo-gradient and steps from the previous
global along it (Reddi et al., 2021, "Adaptive Federated Optimization"):

- `FedAvg`: a plain step of size `server_learning_rate` (1.0: the average itself);
- `FedAvgM` (Hsu et al., 2019): momentum on the pseudo-gradient;
- `FedAdam` (Reddi et al.): Adam's moments on it, without bias correction;
- `Scaffold`: FedAvgM's step, without momentum unless `server_momentum` is set; its control
  variates are averaged beside the weights and the sites correct their gradients with them
  (training/scaffold.py).

The state (momentum, moments) lives across rounds in the rule object. Only trainable
parameters are stepped: BatchNorm running statistics are statistics, not weights, and integer
buffers are counters; both keep their averaged value.
"""
import torch


class FedAvg:
    name = "fedavg"
    default_learning_rate = 1.0

    def __init__(self, learning_rate=None):
        self.learning_rate = self.default_learning_rate if learning_rate is None else learning_rate
        self.state = {}  # parameter name -> the rule's memory (momentum, moments)

    def step(self, previous, averaged, parameter_names):
        """The next global weights: `averaged`, with every name in `parameter_names` replaced by
        previous + the rule's step along (averaged - previous)."""
        next_global = dict(averaged)
        if self.is_identity:
            return next_global
        for name in parameter_names:
            old = previous.get(name)
            if old is None or old.shape != averaged[name].shape:
                continue  # a parameter new this round (QAT just started): nothing to step from
            delta = averaged[name].double() - old.double()
            next_global[name] = (old.double() + self.server_step(name, delta)).to(averaged[name].dtype)
        return next_global

    @property
    def is_identity(self):
        # A step of 1 along (average - previous) is the average; skipping the arithmetic keeps
        # it bit for bit.
        return type(self).server_step is FedAvg.server_step and self.learning_rate == 1.0

    def server_step(self, name, delta):
        """The change to the previous global for pseudo-gradient `delta`."""
        return self.learning_rate * delta


class FedAvgM(FedAvg):
    name = "fedavgm"
    default_momentum = 0.3

    def __init__(self, learning_rate=None, momentum=None):
        super().__init__(learning_rate)
        self.momentum = self.default_momentum if momentum is None else momentum

    @property
    def is_identity(self):
        return self.momentum == 0 and self.learning_rate == 1.0

    def server_step(self, name, delta):
        velocity = self.state.get(name)
        velocity = delta if velocity is None else self.momentum * velocity + delta
        self.state[name] = velocity
        return self.learning_rate * velocity


class Scaffold(FedAvgM):
    # The control variates travel beside the weights. Server momentum is off unless asked for:
    # it helped on IID and mildly skewed sites and hurt under strong label skew
    # (docs/federated.md), which no site can see.
    name = "scaffold"
    default_momentum = 0.0


class FedAdam(FedAvg):
    name = "fedadam"
    default_learning_rate = 0.03  # chosen with bench/federated_quality.py (docs/federated.md)

    def __init__(self, learning_rate=None, betas=(0.9, 0.99), epsilon=1e-3):
        super().__init__(learning_rate)
        self.betas, self.epsilon = tuple(betas), epsilon

    def server_step(self, name, delta):
        # epsilon (Reddi et al.'s tau) bounds the step where the pseudo-gradient has been ~0.
        beta1, beta2 = self.betas
        first, second = self.state.get(name, (torch.zeros_like(delta), torch.zeros_like(delta)))
        first = beta1 * first + (1 - beta1) * delta
        second = beta2 * second + (1 - beta2) * delta.square()
        self.state[name] = (first, second)
        return self.learning_rate * first / (second.sqrt() + self.epsilon)


RULES = {rule.name: rule for rule in (FedAvg, FedAvgM, FedAdam, Scaffold)}
AGGREGATIONS = tuple(RULES)


def rule_from_config(config):
    """The aggregation rule config.yml asks for, with its settings. `auto` must have been
    resolved first (inputs.config.resolve_aggregation, when the site's inputs are loaded)."""
    if config.aggregation not in RULES:
        raise ValueError(f"aggregation '{config.aggregation}' is not a rule: resolve it first "
                         "(inputs.config.resolve_aggregation)")
    options = {"fedavgm": {"momentum": config.server_momentum}, "scaffold": {"momentum": config.server_momentum},
               "fedadam": {"betas": config.server_betas, "epsilon": config.server_epsilon}}
    return RULES[config.aggregation](config.server_learning_rate, **options.get(config.aggregation, {}))
