"""The PT2E implementation of quant/'s interface (backend "xnnpack").

torch.export captures the user's model (batch dimension dynamic), torchao's prepare_pt2e /
prepare_qat_pt2e insert ExecuTorch's XNNPACKQuantizer's observers or fake quantization
(int8 weights symmetric per channel on 7 bits, int8 activations affine; conv+bn(+relu) and
linear+relu annotated as one pattern), and convert_pt2e gives the reference int8 graph
(quantize / dequantize ops on plain torch.int8 tensors), which quant.artifacts lowers to
ExecuTorch, ONNX and a torch.export file.

An exported graph is fixed at export: calling `.train()` / `.eval()` on it changes nothing
by itself, and torchao's prepared models refuse the calls. Models made here are a
GraphModule subclass whose train/eval switch the `training` argument of the graph's
batch_norm and dropout ops (exactly, keeping momentum and eps), so the app's training and
evaluation loops treat them like any module. `freeze_qat(batchnorm=True)` keeps batch_norm in
its inference form (running statistics, no updates) from then on, also in training mode:
the pt2e counterpart of torch.ao's freeze_bn_stats (the conv weight is scaled by the running
std in both).
"""

import copy

import torch
from torch import nn

from . import _pt2e
from .engine import QuantInfo, attach_info, info_of
from .errors import QuantizationError

_aten = torch.ops.aten
# op -> index of its `training` argument
_BATCHNORM_OPS = {_aten.batch_norm.default: 5}
_DROPOUT_OPS = {_aten.dropout.default: 2, _aten.feature_dropout.default: 2,
                _aten.alpha_dropout.default: 2, _aten.feature_alpha_dropout.default: 2}
# batch norm forms whose training flag is not an argument (other export IRs)
_FIXED_BATCHNORM_OPS = (_aten._native_batch_norm_legit.default, _aten._native_batch_norm_legit_no_training.default,
                        _aten.native_batch_norm.default)


class Pt2eGraphModule(torch.fx.GraphModule):
    """An exported, prepared or converted graph on which train() / eval() work."""

    def train(self, mode: bool = True):
        set_graph_training(self, mode)
        return super().train(mode)


def _as_pt2e_module(graph_module: torch.fx.GraphModule) -> Pt2eGraphModule:
    """Make `graph_module` a Pt2eGraphModule in place (same tensors, hooks and graph)."""
    # GraphModule gives every instance its own class named GraphModuleImpl; deepcopy rebuilds
    # one from the first class in the MRO that is not so named: ours
    impl = type("GraphModuleImpl", (Pt2eGraphModule,), {})
    graph_module.__class__ = impl
    for name in ("train", "eval"):  # torchao's instance-level refusals
        graph_module.__dict__.pop(name, None)
    graph_module.recompile()  # defines forward on the new class
    return graph_module


def set_graph_training(graph_module: torch.fx.GraphModule, training: bool) -> None:
    """Switch the graph's batch_norm and dropout ops to training or inference behaviour."""
    info = graph_module.meta.get("quant_info")
    batchnorm_training = training and not (info is not None and info.batchnorm_frozen)
    changed = False
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _BATCHNORM_OPS:
            index, wanted = _BATCHNORM_OPS[node.target], batchnorm_training
        elif node.target in _DROPOUT_OPS:
            index, wanted = _DROPOUT_OPS[node.target], training
        elif node.target in _FIXED_BATCHNORM_OPS:
            raise QuantizationError(f"{node.target} in the exported graph: cannot switch train/eval")
        else:
            continue
        if node.args[index] != wanted:
            node.update_arg(index, wanted)
            changed = True
    if changed:
        graph_module.recompile()


def batch_dim(name: str = "batch", max_batch=None):
    return torch.export.Dim(name, min=1, max=max_batch) if max_batch else torch.export.Dim(name, min=1)


def dynamic_batch(example_inputs: tuple, max_batch=None) -> tuple:
    """dynamic_shapes for torch.export: dimension 0 of every input is the (one) batch size."""
    batch = batch_dim(max_batch=max_batch)
    return tuple({0: batch} for _ in example_inputs)


def export_examples(example_inputs: tuple) -> tuple:
    """Example inputs of batch size >= 2: export specialises a dimension of size 1."""
    return tuple(torch.cat([x, x]) if x.dim() > 0 and x.shape[0] == 1 else x for x in example_inputs)


def export(model: nn.Module, example_inputs: tuple, operation: str):
    """torch.export.export with a dynamic batch size; the ExportedProgram."""
    examples = export_examples(example_inputs)
    try:
        with _pt2e.quiet():
            return torch.export.export(model, examples, dynamic_shapes=dynamic_batch(examples))
    except Exception as error:
        raise QuantizationError(
            f"{operation}: torch.export cannot capture {type(model).__name__} with a dynamic batch size "
            f"(backend 'xnnpack' needs an exportable model): {type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        ) from error


# Weights are int8 on 7 bits, [-63, 63], not XNNPACK's default [-127, 127]: ONNX Runtime's
# int8 convolution and matmul kernels on x86 without VNNI (AVX2 only) multiply u8
# activations by s8 weights with vpmaddubsw, which adds two products in a saturating 16-bit
# sum: 2 * 255 * 127 overflows it, 2 * 255 * 63 does not (fbgemm's reduce_range, for the
# same reason). Every file (.pte, .onnx, .pt2) holds this one int8 model.
WEIGHT_QUANT_MIN, WEIGHT_QUANT_MAX = -63, 63


def quantizer(qat: bool, float_layers: tuple = ()):
    lib = _pt2e.pt2e()
    config = lib.get_symmetric_quantization_config(is_per_channel=True, is_qat=qat, weight_qmin=WEIGHT_QUANT_MIN,
                                                   weight_qmax=WEIGHT_QUANT_MAX)
    xnnpack_quantizer = lib.XNNPACKQuantizer().set_global(config)
    if float_layers:
        # set_module_name(name, None) is "not supported yet" in the XNNPACKQuantizer; its filter
        # function leaves every op of those modules unannotated, i.e. in float.
        in_float_layer = [lib.get_module_name_filter(name) for name in float_layers]
        xnnpack_quantizer.set_filter_function(lambda node: not any(test(node) for test in in_float_layer))
    return xnnpack_quantizer


def prepare(model: nn.Module, example_inputs: tuple, backend: str, qat: bool, float_names_of,
            float_layers: tuple = ()) -> nn.Module:
    """`model` (a copy, in train mode for QAT, else eval) exported and prepared."""
    operation = "prepare_qat" if qat else "prepare_ptq"
    exported = export(model, example_inputs, operation).module()
    lib = _pt2e.pt2e()
    try:
        with _pt2e.quiet(), _pt2e.fast_conv_bn_patterns():
            if qat:
                prepared = lib.prepare_qat_pt2e(exported, quantizer(True, float_layers))
            else:
                prepared = lib.prepare_pt2e(exported, quantizer(False, float_layers))
    except Exception as error:
        raise QuantizationError(
            f"{operation}: PT2E could not prepare {type(model).__name__}: {type(error).__name__}: {error}"
        ) from error
    prepared = _as_pt2e_module(prepared)
    attach_info(prepared, QuantInfo(mode="pt2e", backend=backend, example_inputs=example_inputs,
                                    float_names=float_names_of(prepared), qat=qat))
    prepared.train(qat)
    return prepared


def freeze(prepared: nn.Module, observers: bool, batchnorm: bool) -> None:
    if observers:
        with _pt2e.quiet():
            prepared.apply(_pt2e.pt2e().disable_observer)
    if batchnorm:
        info_of(prepared).batchnorm_frozen = True
        set_graph_training(prepared, prepared.training)


def _strip_unused_state(graph_module: torch.fx.GraphModule) -> None:
    """convert_pt2e keeps the float weights (and BatchNorm buffers) next to the int8 ones
    it folded: drop every parameter and buffer the graph no longer reads."""
    graph_module.graph.eliminate_dead_code()
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    named = list(graph_module.named_parameters(remove_duplicate=False)) + list(
        graph_module.named_buffers(remove_duplicate=False))
    for name, _ in named:
        if name not in used:
            owner_path, _, attribute = name.rpartition(".")
            owner = graph_module.get_submodule(owner_path)
            if hasattr(owner, attribute):
                delattr(owner, attribute)
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()


def quantized_ops(graph_module: torch.fx.GraphModule) -> list:
    return [node for node in graph_module.graph.nodes
            if node.op == "call_function" and "quantize_per" in str(node.target)]


def convert(prepared: nn.Module):
    """(reference copy of the prepared model in eval mode, int8 model in eval mode)."""
    info = info_of(prepared)
    model = copy.deepcopy(prepared).cpu()
    model.eval()
    reference = copy.deepcopy(model)
    try:
        with _pt2e.quiet(), _pt2e.fast_conv_bn_patterns():
            int8_model = _pt2e.pt2e().convert_pt2e(model)
    except Exception as error:
        raise QuantizationError(f"convert (pt2e mode): {type(error).__name__}: {error}") from error
    int8_model = _as_pt2e_module(int8_model)
    _strip_unused_state(int8_model)
    attach_info(int8_model, copy.copy(info))
    int8_model.eval()
    if not quantized_ops(int8_model):
        raise QuantizationError(
            f"convert: nothing in the model was quantized by the XNNPACK quantizer "
            f"(it quantizes conv, linear, add, mul, pooling, ...)"
        )
    return reference, int8_model
