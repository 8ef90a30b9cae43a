"""SCAFFOLD's gradient correction for one site and one round (Karimireddy et al., 2020).

On skewed data every site's gradient points towards its own optimum ("client drift").
SCAFFOLD keeps a control variate per trainable parameter: `server` (c, the federation's mean
gradient, broadcast with the global model) and `local` (c_i, this site's own). Every local
gradient g is replaced by g - c_i + c, i.e. this site's direction minus its bias.

The paper's option II derives c_i from the weight change divided by (steps x learning rate),
which only means "mean gradient" for plain SGD. The app trains with Adam, so c_i is option I
in its practical form: the mean of the raw mini-batch gradients this site computed during the
round (the gradient units c and the correction need under any optimizer).
"""
import torch


class ControlVariates:
    """Pass as `control=` to a train function: call `correct(model)` between
    `loss.backward()` and `optimizer.step()`. `server` and `local` map parameter names to
    tensors shaped like the parameters (a name missing from either counts as zeros)."""

    def __init__(self, server, local):
        self.server, self.local = server, local
        self.gradient_sums = {}
        self.corrections = {}  # name -> (c - c_i) on the parameter's device, computed once
        self.steps = 0

    def correct(self, model):
        """Record each parameter's raw gradient, then add (c - c_i) to it in place."""
        for name, parameter in model.named_parameters():
            if parameter.grad is None:
                continue  # frozen or unused this step: nothing to correct
            gradient_sum = self.gradient_sums.get(name)
            raw = parameter.grad.detach()
            self.gradient_sums[name] = raw.clone() if gradient_sum is None else gradient_sum + raw
            parameter.grad.add_(self._correction(name, parameter))
        self.steps += 1

    def _correction(self, name, parameter):
        if name not in self.corrections:
            zeros = torch.zeros(parameter.shape)
            correction = self.server.get(name, zeros) - self.local.get(name, zeros)
            self.corrections[name] = correction.to(device=parameter.device, dtype=parameter.dtype)
        return self.corrections[name]

    def updated_local(self, parameter_shapes):
        """This site's next c_i: the mean raw gradient of the round, on the CPU in float32
        (zeros for parameters that never had a gradient). `parameter_shapes`: name -> shape."""
        if self.steps == 0:
            raise ValueError("SCAFFOLD: the train function never called control.correct(model) "
                             "after loss.backward() (see training/loop.py)")
        return {name: (self.gradient_sums[name].float().cpu() / self.steps
                       if name in self.gradient_sums else torch.zeros(shape))
                for name, shape in parameter_shapes.items()}
