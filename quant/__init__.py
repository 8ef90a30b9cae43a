"""Int8 quantization of a user's PyTorch CNN (torch.ao and torchao live only here).

Backends x86 / fbgemm / qnnpack: torch.ao FX graph mode (eager as fallback), TorchScript file.
Backend xnnpack: torchao PT2E with ExecuTorch's XNNPACK quantizer; write_artifacts gives
model_int8.pte (ExecuTorch), model_int8.onnx (ONNX Runtime) and model_int8.pt2 (torch.export),
measure_artifact runs each in its own runtime.

Post-training static quantization: prepare_ptq -> calibrate -> convert.
Quantization-aware training:       prepare_qat -> train (forward_quant) -> freeze_qat -> convert;
                                   to_float_model gives the trained float weights in the user's class.
Across sites: observer_stats -> merge_observer_stats -> load_observer_stats before convert
(weight_observer_paths: the observers that see only weights, the same at every site);
float_state / load_float_state carry what federated averaging averages.
Int8Recipe: these steps for one model across a federated run (post_static or qat).
"""

from .artifacts import load_artifact, measure_artifact, model_digest, sha256_of, write_artifacts
from .convert import convert
from .engine import BACKENDS, FX_BACKENDS, PT2E_BACKENDS, QUANT_TYPES, mode_of, set_engine
from .errors import QuantizationError
from .float_model import to_float_model
from .prepare import float_output_layer, prepare_ptq, prepare_qat
from .recipe import Int8Recipe, merge_calibration
from .results import latency_ms, save_torchscript, state_dict_size_bytes
from .run import calibrate, forward_quant, freeze_qat
from .timing import measurement_slot
from .stats import (float_state, load_float_state, load_observer_stats, merge_observer_stats, observer_stats,
                    weight_observer_paths)

__all__ = [
    "BACKENDS",
    "FX_BACKENDS",
    "Int8Recipe",
    "PT2E_BACKENDS",
    "QUANT_TYPES",
    "QuantizationError",
    "calibrate",
    "convert",
    "float_output_layer",
    "float_state",
    "forward_quant",
    "freeze_qat",
    "latency_ms",
    "measure_artifact",
    "measurement_slot",
    "load_artifact",
    "load_float_state",
    "load_observer_stats",
    "merge_calibration",
    "merge_observer_stats",
    "model_digest",
    "mode_of",
    "observer_stats",
    "prepare_ptq",
    "prepare_qat",
    "save_torchscript",
    "set_engine",
    "sha256_of",
    "state_dict_size_bytes",
    "to_float_model",
    "weight_observer_paths",
    "write_artifacts",
]
