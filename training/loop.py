"""The default training function (also the template for your own) and evaluation.

Writing your own training function
----------------------------------
Put a file next to your config.yml, e.g. `my_train.py`, and set `train_function: my_train.py`.
It must define

    def train(model, train_loader, epochs, learning_rate): ...

and may also accept `optimizer=None` (the app then passes one optimizer per site that lives
across rounds, so Adam's moments are not reset every round), `device="cpu"` (where to train:
the app moves the model there and back), and `mu=0.0, global_weights=None` (FedProx: with
`mu: 0.01` in config.yml the app passes the round's global parameters by name; add
`proximal_term(model, global_weights, mu)` to the loss), and `control=None` (SCAFFOLD: with
`aggregation: scaffold` the app passes a `training.scaffold.ControlVariates`; call
`control.correct(model)` between `loss.backward()` and `optimizer.step()`), and
`logit_offset=None` (logit adjustment against label skew, `logit_adjustment` in config.yml: a
tensor [classes] to add to the logits inside the training loss only, e.g. through
`training.label_shift.adjusted_logits`). Copy `train` below as a starting point. Two rules:

* Call the model through `forward_quant(model, inputs)`, not `model(inputs)`: with
  `quant_type: qat` the model is prepared for quantization-aware training, and `forward_quant`
  is what feeds it correctly. For a float model it is the same as `model(inputs)`.
* Train `model` in place; what it returns is ignored. After every round the app measures
  the train loss and accuracy itself, the same way for its own loop and for yours.
"""
from dataclasses import dataclass

import torch
from torch import nn

from quant import forward_quant
from training.label_shift import adjusted_logits


def train(model, train_loader, epochs, learning_rate, optimizer=None, device="cpu",
          mu=0.0, global_weights=None, control=None, logit_offset=None) -> dict:
    """Train `model` in place for `epochs` passes over `train_loader` with Adam and cross-entropy
    (+ FedProx's proximal term when `mu` > 0: `global_weights` then maps parameter names to the
    round's global values; + SCAFFOLD's gradient correction when `control` is given; the loss
    sees `logits + logit_offset` when an offset is given, training.label_shift).

    Returns {"loss": mean loss per sample in the last epoch, "accuracy": its training accuracy}.
    """
    if epochs < 1:
        raise ValueError(f"train: epochs must be >= 1, got {epochs}")
    if mu > 0 and global_weights is None:
        raise ValueError("train: mu > 0 (FedProx) needs global_weights")
    model.to(device)
    if mu > 0:
        global_weights = {name: value.to(device) for name, value in global_weights.items()}
    model.train()  # dropout and batch-norm in training behaviour
    if optimizer is None:
        # A fresh optimizer per call. The app passes its own to keep Adam's state across rounds.
        optimizer = make_optimizer(model, learning_rate)
    loss_function = nn.CrossEntropyLoss()

    for _ in range(epochs):
        # Per-epoch totals; only the last epoch's are returned.
        loss_sum, correct, seen = 0.0, 0, 0
        for inputs, labels in train_loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            logits = forward_quant(model, inputs)  # not model(inputs): see the module docstring
            loss = loss_function(logits if logit_offset is None else adjusted_logits(logits, logit_offset), labels)
            objective = loss + proximal_term(model, global_weights, mu) if mu > 0 else loss
            objective.backward()
            if control is not None:
                control.correct(model)  # SCAFFOLD: g - c_i + c
            optimizer.step()
            # Weight each batch by its size: the last batch is usually smaller.
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += len(labels)

    if seen == 0:
        raise ValueError("train: the train loader yielded no samples")
    return {"loss": loss_sum / seen, "accuracy": correct / seen}


def make_optimizer(model, learning_rate):
    """The default train loop's optimizer (the app builds the one it keeps across rounds here
    too, so `learning_rate` reaches Adam in one place)."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate)


def proximal_term(model, global_weights, mu):
    """FedProx (Li et al., 2020): mu/2 * ||w - w_global||^2 over the trainable parameters,
    which keeps a site's model near the round's global model on skewed data."""
    squared = sum((parameter - global_weights[name]).square().sum()
                  for name, parameter in model.named_parameters() if parameter.requires_grad)
    return 0.5 * mu * squared


@dataclass
class Evaluation:
    loss: float            # mean cross-entropy per sample
    accuracy: float        # fraction of correct predictions
    n: int                 # number of samples
    y_true: torch.Tensor   # int64 [n], the labels in loader order
    y_pred: torch.Tensor   # int64 [n], argmax of the model's outputs


@torch.no_grad()
def evaluate(model, loader, device="cpu") -> Evaluation:
    """Evaluate a float or int8 model on every sample of `loader`.

    The model's train/eval mode is restored afterwards, so evaluating between training rounds
    does not change how the next round trains.
    """
    was_training = model.training
    model.eval()
    try:
        loss_sum, true_batches, pred_batches = 0.0, [], []
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            logits = forward_quant(model, inputs).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            true_batches.append(labels.long().cpu())
            pred_batches.append(logits.argmax(dim=1).cpu())
    finally:
        model.train(was_training)

    if not true_batches:
        raise ValueError("evaluate: the loader yielded no samples")
    y_true, y_pred = torch.cat(true_batches), torch.cat(pred_batches)
    n = len(y_true)
    return Evaluation(loss=loss_sum / n, accuracy=(y_true == y_pred).float().mean().item(),
                      n=n, y_true=y_true, y_pred=y_pred)
