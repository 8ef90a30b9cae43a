"""Model selection and early stopping, decided by the coordinator after each round from the
federation validation loss (config keys `keep`, `patience`; docs/federated.md).

keep: best keeps the round of lowest federation validation loss (the first such round on a
tie), keep: last the latest round. patience: training stops after that many rounds without a
lower federation validation loss than the best so far (0: never early). Rounds before
`first_candidate` (QAT's float warm-up rounds, whose model has another structure than the one
converted) are neither kept nor counted.
"""
from dataclasses import dataclass


KEEPS = ("best", "last")


@dataclass
class Decision:
    """What every site needs after a round: the broadcast `round_<r>` message's content (with
    the coordinator's keep and patience, which every site's report quotes)."""
    round: int
    kept_round: int
    stop: bool
    best_validation_loss: float | None
    keep: str
    patience: int

    def to_meta(self):
        return dict(vars(self))


class ModelSelection:
    def __init__(self, keep="best", patience=0, max_iter=1, first_candidate=1):
        self.keep, self.patience, self.max_iter = keep, patience, max_iter
        self.first_candidate = first_candidate
        self.best_round, self.best_loss = None, None
        self.rounds_without_improvement = 0

    def observe(self, round_number, validation_loss):
        """The decision after `round_number`, whose federation validation loss (None: no site has
        a validation split) is `validation_loss`."""
        if round_number >= self.first_candidate and validation_loss is not None:
            if self.best_loss is None or validation_loss < self.best_loss:
                self.best_round, self.best_loss = round_number, validation_loss
                self.rounds_without_improvement = 0
            else:
                self.rounds_without_improvement += 1
        stop = 0 < self.patience <= self.rounds_without_improvement and round_number < self.max_iter
        kept = self.best_round if self.keep == "best" and self.best_round is not None else round_number
        return Decision(round_number, kept, stop, self.best_loss, self.keep, self.patience)


def selection_report(decision, max_iter, model_ema=0.0):
    """metrics.json's "selection": which round's model was written and why, in words too
    ("best validation loss 0.123 at round 4 of 10"; "stopped early after round 7: ...";
    with model_ema, that the written model is the moving average up to the kept round)."""
    if decision.keep == "last":
        reasons = [f"the last round ({decision.round} of {max_iter}), as keep: last says"]
    elif decision.best_validation_loss is None:
        reasons = [f"the last round ({decision.round} of {max_iter}): no validation loss to select by"]
    else:
        reasons = [f"best validation loss {decision.best_validation_loss:.3f} at round "
                   f"{decision.kept_round} of {decision.round}"]
    if decision.stop:
        rounds = "round" if decision.patience == 1 else "rounds"
        reasons.append(f"stopped early after round {decision.round}: no improvement for "
                       f"{decision.patience} {rounds}")
    if model_ema:
        reasons.append(f"the written model is the moving average (model_ema {model_ema:g}) of the global "
                       f"models of rounds 1 to {decision.kept_round}")
    return {**decision.to_meta(), "model_ema": model_ema, "rounds_run": decision.round, "max_iter": max_iter,
            "stopped_early": decision.stop, "reason": "; ".join(reasons)}
