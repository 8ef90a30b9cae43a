"""Deployable int8 files, each run and measured in its own runtime.

backend "xnnpack" (PT2E), from the converted model:
  model_int8.pte   ExecuTorch program, XNNPACK delegate, dynamic batch size (1..max_batch;
                   larger batches are run in chunks by `load_artifact`)
  model_int8.onnx  QDQ ONNX (QuantizeLinear/DequantizeLinear around Conv/Gemm), onnxruntime
  model_int8.pt2   the quantized torch.export program (torch.export.save / torch.export.load)
backends x86 / fbgemm / qnnpack (FX): model_int8.pt, TorchScript (quant.save_torchscript).

Every file is byte-deterministic: the same int8 model written twice, in one process or in
two (two sites holding identical merged statistics), gives the same bytes, so its SHA-256
is a one-line check that every site holds the same model. For that, the exported graph is
written without its debug metadata (stack traces hold file paths and counters of the
writing process), ONNX without its per-node metadata, and TorchScript with its random
serialization id replaced by a digest of the file's other records (see results.py).
"""

import hashlib
import io
import os
import re
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

from . import _pt2e
from .engine import FX_BACKENDS, PT2E_BACKENDS, info_of, set_engine
from .errors import QuantizationError
from .pt2e import dynamic_batch, export_examples
from .results import save_torchscript, with_digest_serialization_id
from .timing import median_ms

ARTIFACT_FILES = {"pte": "model_int8.pte", "onnx": "model_int8.onnx", "pt2": "model_int8.pt2"}
TORCHSCRIPT_FILE = "model_int8.pt"
# ExecuTorch plans the input and output memory for the largest batch it will be given
MAX_BATCH = 1024
# node metadata that depends on where and by which process the model was written.
# nn_module_stack names each layer's class by the module it was imported as, and a user's model
# file is imported under a name numbered per process (inputs.model_file): two sites run in one
# process wrote different .pt2 files. Nothing here reads it (the .pte and .onnx bytes are the
# same without it); only torch.export.unflatten would.
_VOLATILE_META = ("stack_trace", "source_fn_stack", "from_node", "seq_nr", "nn_module_stack")


# --- writing --------------------------------------------------------------------------


def export_int8(int8_model: nn.Module, example_inputs: tuple):
    """The converted pt2e model as an ExportedProgram with a dynamic batch size."""
    # Zeros of the example's shape: an exported program keeps its sample inputs, and a site's
    # own test sample must neither leave it in a file nor make its file differ from the others'.
    examples = export_examples(tuple(torch.zeros_like(x.detach().cpu()) for x in example_inputs))
    try:
        with _pt2e.quiet():
            program = torch.export.export(int8_model.cpu().eval(), examples, dynamic_shapes=dynamic_batch(examples))
    except Exception as error:
        raise QuantizationError(f"write_artifacts: torch.export of the int8 model failed: {error}") from error
    for node in program.graph.nodes:
        for key in _VOLATILE_META:
            node.meta.pop(key, None)
    return program


class _BatchUpperBound(PassBase):
    """ExecuTorch's memory planning needs every dynamic size's upper bound. Its default pass
    reads them from the shape environment, where the fake convolution kernels of torch 2.14
    narrow the batch size to at most 15 while lowering (the example batch being small): a
    .pte so planned refuses batch 16. Here each size's bound is that of batch <= max_batch."""

    def __init__(self, max_batch: int):
        super().__init__()
        self.max_batch = max_batch

    def _upper(self, size):
        if isinstance(size, int):
            return size
        expr = size.node.expr
        ranges = {symbol: ValueRanges(1, self.max_batch) for symbol in expr.free_symbols}
        return int(bound_sympy(expr, ranges).upper)

    def call(self, graph_module):
        tensor_spec = _pt2e.executorch_lowering().TensorSpec
        for module in graph_module.modules():
            if not isinstance(module, torch.fx.GraphModule):
                continue
            for node in module.graph.nodes:
                specs = node.meta.get("spec", [])
                for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
                    if isinstance(spec, tensor_spec):
                        spec.shape = [self._upper(s) for s in spec.shape]
                        spec.stride = [self._upper(s) for s in spec.stride]
        return PassResult(graph_module, True)


def pte_bytes(program, max_batch: int = MAX_BATCH) -> bytes:
    """ExecuTorch program with every supported op delegated to XNNPACK."""
    lib = _pt2e.executorch_lowering()
    with _pt2e.quiet():
        edge = lib.to_edge_transform_and_lower(program, partitioner=[lib.XnnpackPartitioner()])
        config = lib.ExecutorchBackendConfig(sym_shape_eval_pass=_BatchUpperBound(max_batch))
        return bytes(edge.to_executorch(config).buffer)


def onnx_bytes(program) -> bytes:
    """QDQ ONNX through torch.onnx's dynamo exporter, without per-node debug metadata."""
    with _pt2e.quiet(), contextlib_redirect():
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, optimize=True)
    model = onnx_program.model_proto
    for node in _all_nodes(model.graph):
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.metadata_props[:]
    model.graph.doc_string = ""
    return model.SerializeToString(deterministic=True)


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g is not None:
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


def contextlib_redirect():
    """torch.onnx prints its progress on stdout whatever `verbose` says in some versions."""
    import contextlib

    return contextlib.redirect_stdout(io.StringIO())


def pt2_bytes(program) -> bytes:
    buffer = io.BytesIO()
    program.example_inputs = None  # the file runs without them, and they would differ by site
    with _pt2e.quiet():
        torch.export.save(program, buffer)
    return with_digest_serialization_id(buffer.getvalue(), ARTIFACT_FILES["pt2"])


def write_artifacts(int8_model: nn.Module, example_inputs: tuple, out_dir, backend: str,
                    max_batch: int = MAX_BATCH) -> dict:
    """Write the backend's int8 files into `out_dir`; {"pte"|"onnx"|"pt2"|"pt": path}.

    Each file is loaded back in its own runtime and must reproduce the int8 model's
    predictions on the example input (else QuantizationError)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example_inputs = tuple(x.detach().cpu() for x in example_inputs)
    if backend in FX_BACKENDS:
        path = out_dir / TORCHSCRIPT_FILE
        save_torchscript(int8_model, example_inputs, path, backend)
        return {"pt": path}
    if backend not in PT2E_BACKENDS:
        raise QuantizationError(f"write_artifacts: unknown backend {backend!r}")
    if info_of(int8_model).mode != "pt2e":
        raise QuantizationError("write_artifacts: backend 'xnnpack' needs an int8 model converted by quant.convert")
    program = export_int8(int8_model, example_inputs)
    contents = {"pte": pte_bytes(program, max_batch), "onnx": onnx_bytes(program), "pt2": pt2_bytes(program)}
    paths = {}
    for kind, data in contents.items():
        path = out_dir / ARTIFACT_FILES[kind]
        path.write_bytes(data)
        paths[kind] = path
    _check_reproduces(int8_model, example_inputs, paths)
    return paths


def _check_reproduces(int8_model, example_inputs, paths) -> None:
    with torch.no_grad(), _pt2e.quiet():
        expected = int8_model(*example_inputs)
    for kind, path in paths.items():
        # the file itself, not onnxruntime's CPU-dependent fused int8 kernels (see _OnnxRunner)
        output = (_OnnxRunner(path, 1, optimization="basic") if kind == "onnx" else load_artifact(path))(*example_inputs)
        scale = float(expected.abs().max()) or 1.0
        deviation = float((output - expected).abs().max()) / scale
        # the runtimes' int8 kernels round differently from the reference graph by a step or
        # two: a few percent of the range at most; a broken file is far off
        if deviation > 0.1:
            raise QuantizationError(
                f"write_artifacts: {path.name} run in its runtime differs from the int8 model by "
                f"{deviation:.1%} of the output range on the example input")


# --- loading and running, each in its own runtime -----------------------------------


class _ExecuTorchRunner:
    def __init__(self, path, threads):
        lib = _pt2e.executorch_runtime()
        with _pt2e.quiet():
            if threads is not None:
                lib.set_threads(threads)  # ExecuTorch's one global threadpool, XNNPACK's too
            program = lib.Runtime.get().load_program(Path(path))
            self.method = program.load_method("forward")
            self.max_batch = int(program.metadata("forward").input_tensor_meta(0).sizes()[0])

    def __call__(self, *inputs):
        batch = inputs[0].shape[0]
        outputs = []
        with _pt2e.quiet():
            for start in range(0, batch, self.max_batch):
                chunk = [x[start:start + self.max_batch].contiguous() for x in inputs]
                outputs.append(self.method.execute(chunk)[0])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class _OnnxRunner:
    """optimization "all" (onnxruntime's default): QDQ fused into int8 kernels. On x86 CPUs
    without VNNI (AVX2 only) these compute u8 x s8 products with saturating 16-bit sums,
    which full-range int8 weights can overflow; the xnnpack path's weights use 7 bits for
    that reason (quant.pt2e.WEIGHT_QUANT_MAX). "basic": no QDQ fusion, float kernels between
    exact (de)quantization: the file itself, whatever the CPU."""

    def __init__(self, path, threads, optimization="all"):
        ort = _pt2e.onnxruntime()
        options = ort.SessionOptions()
        if optimization == "basic":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs):
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(self.names, inputs)}
        return torch.from_numpy(self.session.run(None, feeds)[0])


class _TorchRunner:
    """.pt2 (torch.export.load) or .pt (TorchScript): PyTorch's CPU threads are process-wide,
    so the thread count is set around each call and restored."""

    def __init__(self, model, threads):
        self.model, self.threads = model, threads

    def __call__(self, *inputs):
        saved = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad(), _pt2e.quiet():
                return self.model(*inputs)
        finally:
            torch.set_num_threads(saved)


def load_artifact(path, threads=1, backend=None):
    """A function batch -> logits running the file in its own runtime: ExecuTorch (.pte),
    onnxruntime (.onnx), torch.export.load (.pt2), torch.jit.load (.pt, with `backend`'s
    engine). `threads`: intra-op threads (None: the runtime's default)."""
    path = Path(path)
    suffix = path.suffix
    if suffix == ".pte":
        return _ExecuTorchRunner(path, threads)
    if suffix == ".onnx":
        return _OnnxRunner(path, threads)
    if suffix == ".pt2":
        _pt2e.quantized_decomposed_ops()
        with _pt2e.quiet():
            return _TorchRunner(torch.export.load(str(path)).module(), threads)
    if suffix == ".pt":
        from . import _ao

        if backend is not None:
            set_engine(backend)
        with _ao.quiet():
            return _TorchRunner(torch.jit.load(str(path)), threads)
    raise QuantizationError(f"load_artifact: unknown kind of file {path.name}")


# --- measuring ------------------------------------------------------------------------


_MANGLED = re.compile(rb"[./]?___torch_mangle_\d+")


def model_digest(path) -> str:
    """What identifies the model in a file: its SHA-256, except for TorchScript, whose class
    names carry `___torch_mangle_<n>` when one process scripts several models (sites simulated
    in one process, bench.simulate): there, the SHA-256 of its records with those suffixes
    removed. Across processes (the app: one site per process) the file bytes are identical."""
    path = Path(path)
    if path.suffix != ".pt":
        return sha256_of(path)
    digest = hashlib.sha256()
    with zipfile.ZipFile(path) as archive:
        # Left out: the serialization id (a digest of the records as written) and the debug
        # records (source ranges, whose pickled string lengths count the mangled names).
        records = sorted((_MANGLED.sub(b"", info.filename.encode()), _MANGLED.sub(b"", archive.read(info)))
                         for info in archive.infolist()
                         if not info.filename.endswith((".data/serialization_id", ".debug_pkl")))
    for name, content in records:
        digest.update(len(name).to_bytes(8, "little") + name + len(content).to_bytes(8, "little") + content)
    return digest.hexdigest()


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _batch_of(loader, size: int) -> torch.Tensor:
    """`size` inputs from the loader (repeated if it holds fewer)."""
    parts, count = [], 0
    while count < size:
        for inputs, _labels in loader:
            parts.append(inputs)
            count += len(inputs)
            if count >= size:
                break
        if not parts:
            raise QuantizationError("measure_artifact: the test loader yielded no batch")
    return torch.cat(parts)[:size].contiguous()


def measure_artifact(path, test_loader, batch_sizes=(1,), repeats: int = 20, warmup: int = 3,
                     backend=None) -> dict:
    """Accuracy on every sample of `test_loader` (inputs, labels), file size and SHA-256, and
    median latency (ms, one thread) per batch size, all with the file in its own runtime."""
    path = Path(path)
    run = load_artifact(path, threads=1, backend=backend)
    correct, total = 0, 0
    for inputs, labels in test_loader:
        predictions = run(inputs.cpu()).argmax(dim=-1)
        correct += int((predictions == labels.cpu()).sum())
        total += len(labels)
    if total == 0:
        raise QuantizationError("measure_artifact: the test loader yielded no sample")
    latency = {int(size): median_ms(run, _batch_of(test_loader, int(size)), repeats, warmup)
               for size in batch_sizes}
    return {"accuracy": correct / total, "n": total, "size_bytes": os.path.getsize(path),
            "sha256": sha256_of(path), "digest": model_digest(path), "latency_ms": latency}
