"""The one door to torch.ao.quantization (and its deprecation warnings).

torch.ao.quantization is deprecated (torchao's pt2e flow replaces it) but it is the
flow that gives fast int8 CPU models without a C++ compiler. Every entry point the
package uses is imported here, and its deprecation noise is silenced here, so that
the rest of `quant/` (and the whole app) never names torch.ao directly.

The warnings are filtered per call (not globally) because pytest and other tools
reset global warning filters; a per-call `catch_warnings` survives that.
"""

import contextlib
import functools
import warnings

from torch.ao.nn.intrinsic.qat import freeze_bn_stats as _freeze_bn_stats
from torch.ao.quantization import (
    DeQuantStub,
    QuantStub,
    convert as _eager_convert,
    disable_fake_quant as _disable_fake_quant,
    disable_observer as _disable_observer,
    fuse_modules as _fuse_modules,
    fuse_modules_qat as _fuse_modules_qat,
    get_default_qat_qconfig as _get_default_qat_qconfig,
    get_default_qat_qconfig_mapping as _get_default_qat_qconfig_mapping,
    get_default_qconfig as _get_default_qconfig,
    get_default_qconfig_mapping as _get_default_qconfig_mapping,
    prepare as _eager_prepare,
    prepare_qat as _eager_prepare_qat,
)
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.fx.tracer import QuantizationTracer
from torch.ao.quantization.observer import HistogramObserver, ObserverBase
from torch.ao.quantization.quantize_fx import (
    convert_fx as _convert_fx,
    prepare_fx as _prepare_fx,
    prepare_qat_fx as _prepare_qat_fx,
)

# (category, message regex) of the warnings torch.ao emits on every use.
_DEPRECATION_NOISE = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (FutureWarning, r"torch\.ao\.quantization is deprecated"),
    # the C++ warning about torch.quint8 / torch.qint8 tensors
    (UserWarning, r".*quantized tensor creation functions.*deprecated"),
    (UserWarning, r".*(quint8|qint8).*deprecated"),
    # TorchScript, the format an int8 model of torch.ao is saved in, is deprecated too
    (FutureWarning, r"`torch\.jit\.\w+` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.\w+` is deprecated"),
    # scripting torch.ao's own eager-mode wrappers (their attribute annotations)
    (UserWarning, r"The TorchScript type system doesn't support instance-level annotations"),
    # the default qconfigs still pass reduce_range
    (UserWarning, r"Please use quant_min and quant_max"),
)

# Module paths of the int8 layers that convert produces.
QUANTIZED_MODULE_PREFIXES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")


@contextlib.contextmanager
def quiet():
    """Silence torch.ao's deprecation warnings inside the block (and only those)."""
    with warnings.catch_warnings():
        for category, message in _DEPRECATION_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def _quietly(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with quiet():
            return function(*args, **kwargs)

    return wrapper


prepare_fx = _quietly(_prepare_fx)
prepare_qat_fx = _quietly(_prepare_qat_fx)
convert_fx = _quietly(_convert_fx)
eager_prepare = _quietly(_eager_prepare)
eager_prepare_qat = _quietly(_eager_prepare_qat)
eager_convert = _quietly(_eager_convert)
fuse_modules = _quietly(_fuse_modules)
fuse_modules_qat = _quietly(_fuse_modules_qat)
disable_observer = _quietly(_disable_observer)
disable_fake_quant = _quietly(_disable_fake_quant)
freeze_bn_stats = _quietly(_freeze_bn_stats)
get_default_qconfig = _quietly(_get_default_qconfig)
get_default_qat_qconfig = _quietly(_get_default_qat_qconfig)
get_default_qconfig_mapping = _quietly(_get_default_qconfig_mapping)
get_default_qat_qconfig_mapping = _quietly(_get_default_qat_qconfig_mapping)

__all__ = [
    "DeQuantStub",
    "FakeQuantizeBase",
    "HistogramObserver",
    "ObserverBase",
    "QUANTIZED_MODULE_PREFIXES",
    "QuantStub",
    "QuantizationTracer",
    "convert_fx",
    "disable_fake_quant",
    "disable_observer",
    "eager_convert",
    "eager_prepare",
    "eager_prepare_qat",
    "freeze_bn_stats",
    "fuse_modules",
    "fuse_modules_qat",
    "get_default_qat_qconfig",
    "get_default_qat_qconfig_mapping",
    "get_default_qconfig",
    "get_default_qconfig_mapping",
    "prepare_fx",
    "prepare_qat_fx",
    "quiet",
]
