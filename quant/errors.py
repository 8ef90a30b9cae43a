"""The one error type of the quant package."""


class QuantizationError(Exception):
    """A model cannot be quantized, or quantization state is inconsistent.

    The message names the module, operation, file or key at fault.
    """
