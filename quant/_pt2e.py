"""The one door to torchao's PT2E flow, ExecuTorch and ONNX Runtime (and their noise).

Like `_ao.py` for torch.ao: every entry point of torchao, executorch, onnx and onnxruntime
that `quant/` uses is reached through here, and the warnings and log lines these packages
emit on import and on every use are silenced here, per call (pytest and other tools reset
global warning filters; a per-call `catch_warnings` survives that).

The imports are lazy: importing torchao and executorch takes seconds (executorch.exir about
10 s on a busy 2-core machine), and the FX backends never need them.
"""

import contextlib
import copy
import functools
import importlib
import logging
import sys
import types
import warnings

# (category, message regex) of what these packages emit on import or on every use.
_NOISE = (
    # executorch reads its resources with importlib.resources' legacy API (Python 3.11)
    (DeprecationWarning, r"(read_text|open_text|read_binary|open_binary|path|contents|is_resource) is deprecated"),
    # executorch.exir._warnings.ExperimentalWarning (a DeprecationWarning) on its pybindings
    (DeprecationWarning, r"This API is experimental and subject to change"),
    # torch.onnx.export of a GraphModule whose `training` flag export cannot see through
    (UserWarning, r"Exporting a model while it is in training mode"),
    # torchao's observers on the graph's constant weights
    (UserWarning, r"must run observer before calling calculate_qparams"),
)

# Loggers that print warnings of these packages' own (not Python warnings):
# torchao registers enums with torch's pytree ("register_constant() on Enum subclasses is
# deprecated"); torch.onnx reports its steps.
_NOISY_LOGGERS = ("torch.utils._pytree", "torch.onnx", "torch.onnx._internal.exporter._core",
                  "torch._export", "executorch")


@contextlib.contextmanager
def quiet():
    """Silence the PT2E / ExecuTorch / ONNX noise inside the block (and only that)."""
    saved = {}
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category, message in _NOISE:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _import(name):
    with quiet():
        return importlib.import_module(name)


@functools.cache
def pt2e():
    """torchao's PT2E entry points and ExecuTorch's XNNPACK quantizer."""
    quantize = _import("torchao.quantization.pt2e.quantize_pt2e")
    package = _import("torchao.quantization.pt2e")
    xnnpack = _import("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    quantizer_utils = _import("torchao.quantization.pt2e.quantizer")
    return types.SimpleNamespace(
        prepare_pt2e=quantize.prepare_pt2e,
        prepare_qat_pt2e=quantize.prepare_qat_pt2e,
        convert_pt2e=quantize.convert_pt2e,
        disable_observer=package.disable_observer,
        ObserverBase=package.ObserverBase,
        FakeQuantizeBase=package.FakeQuantizeBase,
        XNNPACKQuantizer=xnnpack.XNNPACKQuantizer,
        get_symmetric_quantization_config=xnnpack.get_symmetric_quantization_config,
        get_module_name_filter=quantizer_utils.get_module_name_filter,
    )


@functools.cache
def executorch_lowering():
    exir = _import("executorch.exir")
    partitioner = _import("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    sym_util = _import("executorch.exir.sym_util")
    tensor = _import("executorch.exir.tensor")
    pass_base = _import("torch.fx.passes.infra.pass_base")
    return types.SimpleNamespace(
        to_edge_transform_and_lower=exir.to_edge_transform_and_lower,
        ExecutorchBackendConfig=exir.ExecutorchBackendConfig,
        XnnpackPartitioner=partitioner.XnnpackPartitioner,
        TensorSpec=tensor.TensorSpec,
        PassBase=pass_base.PassBase,
        PassResult=pass_base.PassResult,
        eval_upper_bound=sym_util.eval_upper_bound,
    )


@functools.cache
def executorch_runtime():
    runtime = _import("executorch.runtime")
    portable = _import("executorch.extension.pybindings.portable_lib")
    return types.SimpleNamespace(
        Runtime=runtime.Runtime,
        set_threads=portable._unsafe_reset_threadpool,
        get_threads=portable._threadpool_get_thread_count,
    )


@functools.cache
def quantized_decomposed_ops():
    """Register torch.ops.quantized_decomposed.* (quantize / dequantize on torch.int8), which
    a .pt2 file of a pt2e int8 model calls: torch.export.load fails without them. torchao
    registers them on import; this module is where they are defined."""
    return _import("torch.ao.quantization.fx._decomposed")


@functools.cache
def onnx():
    return _import("onnx")


@functools.cache
def onnxruntime():
    return _import("onnxruntime")


def _loaded() -> bool:
    # a module cannot be one of torchao's observers unless torchao was imported
    return "torchao.quantization.pt2e" in sys.modules


def observer_classes() -> tuple:
    """torchao's observer base class, if torchao is loaded (else ())."""
    return (pt2e().ObserverBase,) if _loaded() else ()


def fake_quant_classes() -> tuple:
    """torchao's fake-quantize base class, if torchao is loaded (else ())."""
    return (pt2e().FakeQuantizeBase,) if _loaded() else ()


# --- conv+bn patterns ---------------------------------------------------------------------
# XNNPACKQuantizer.annotate, prepare_qat_pt2e and convert_pt2e find conv+bn by matching
# pattern graphs that they build by torch.export-ing small functions: 12 to annotate, 3 per
# kind of convolution (conv1d, conv2d, conv_transpose1d, conv_transpose2d) to prepare QAT and
# 24 per kind to convert QAT, about a second each on a busy 2-core machine, on every call,
# whatever the model holds. Here: kinds of convolution the graph does not contain are
# skipped (their patterns cannot match), conv+bn annotation is skipped for a graph without
# batch_norm, and each pattern graph is built once per process (it depends only on the
# pattern function, its flags and the example shapes, not on the model).

_PATTERN_CACHE = {}


def _shape_key(value):
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return ("tensor", tuple(value.shape), str(value.dtype), str(value.device))
    return value


def _pattern_key(pattern, example_inputs, is_cuda, kwargs):
    pattern = getattr(pattern, "fn", pattern)  # torchao's WrapperModule(function)
    cells = tuple(cell.cell_contents for cell in (getattr(pattern, "__closure__", None) or ()))
    key = (getattr(pattern, "__code__", pattern), cells, tuple(_shape_key(x) for x in example_inputs),
           is_cuda, tuple(sorted((name, _shape_key(value)) for name, value in kwargs.items())))
    hash(key)  # TypeError: not cacheable
    return key


def _memoized_patterns(build):
    def get(pattern, example_inputs, is_cuda=False, **kwargs):
        try:
            key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        except TypeError:
            return build(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERN_CACHE:
            _PATTERN_CACHE[key] = build(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERN_CACHE[key])

    return get


def _only_if_present(helper):
    def run(m, conv_fn, example_inputs, is_cuda, *args, **kwargs):
        prefix = f"aten.{conv_fn.__name__}."
        if not any(node.op == "call_function" and str(node.target).startswith(prefix) for node in m.graph.nodes):
            return m
        return helper(m, conv_fn, example_inputs, is_cuda, *args, **kwargs)

    return run


def _only_with_batchnorm(annotate):
    def run(gm, *args, **kwargs):
        if not any(node.op == "call_function" and "batch_norm" in str(node.target) for node in gm.graph.nodes):
            return []
        return annotate(gm, *args, **kwargs)

    return run


@contextlib.contextmanager
def fast_conv_bn_patterns():
    qat_utils = _import("torchao.quantization.pt2e.qat_utils")
    annotator = _import("executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils")
    wrappers = [(qat_utils, "_get_aten_graph_module_for_pattern", _memoized_patterns),
                (qat_utils, "_fuse_conv_bn_qat_helper", _only_if_present),
                (qat_utils, "_fold_conv_bn_qat_helper", _only_if_present),
                (annotator, "_get_aten_graph_module_for_pattern", _memoized_patterns),
                (annotator, "_do_annotate_conv_bn", _only_with_batchnorm)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in wrappers]
    for module, name, wrap in wrappers:
        setattr(module, name, wrap(getattr(module, name)))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
