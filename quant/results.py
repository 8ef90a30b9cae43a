"""What is reported about and saved of an int8 model."""

import contextlib
import hashlib
import io
import struct
import zipfile
import zlib
from pathlib import Path

import torch
from torch import nn

from . import _ao
from .engine import FX_BACKENDS, set_engine
from .errors import QuantizationError
from .run import forward_quant
from .timing import median_ms


class _SortedIterationSet(set):
    """A set that iterates in sorted order (by str): see _deterministic_scripting."""

    def __iter__(self):
        items = list(set.__iter__(self))
        try:
            return iter(sorted(items, key=str))
        except TypeError:
            return iter(items)


@contextlib.contextmanager
def _deterministic_scripting():
    """TorchScript collects a module's constants (`__constants__`, Final attributes) in a set
    and writes them in its iteration order, which follows the process's string hash seed:
    two sites wrote MaxPool2d's code file with its attributes in different orders. Inside
    this block torch.jit's recursive scripting iterates its sets in sorted order."""
    recursive = torch.jit._recursive
    had_own = "set" in vars(recursive)
    saved = vars(recursive).get("set")
    recursive.set = _SortedIterationSet
    try:
        yield
    finally:
        if had_own:
            recursive.set = saved
        else:
            del recursive.set


_SERIALIZATION_ID = ".data/serialization_id"


def _deterministic_serialization_id(path) -> None:
    """The same as `with_digest_serialization_id`, in place on a file."""
    Path(path).write_bytes(with_digest_serialization_id(Path(path).read_bytes(), str(path)))


def with_digest_serialization_id(archive_bytes: bytes, label: str) -> bytes:
    """torch.jit.save and torch.export.save write a random `.data/serialization_id` record:
    replace it (same length, digits) by a digest of the archive's other records, and fix its
    CRC-32 in the local header, the data descriptor and the central directory."""
    data = bytearray(archive_bytes)
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        infos = archive.infolist()
        target = next((i for i in infos if i.filename.endswith(_SERIALIZATION_ID)), None)
        if target is None or target.compress_type != zipfile.ZIP_STORED:
            return bytes(data)
        digest = hashlib.sha256()
        for info in infos:
            if info is not target:
                digest.update(info.filename.encode())
                digest.update(archive.read(info))
    size, old_crc, header = target.file_size, target.CRC, target.header_offset
    new_id = str(int.from_bytes(digest.digest() * 2, "big"))[:size].rjust(size, "0").encode()
    name_length, extra_length = struct.unpack_from("<HH", data, header + 26)
    start = header + 30 + name_length + extra_length
    data[start:start + size] = new_id
    crc = zlib.crc32(new_id)
    if struct.unpack_from("<I", data, header + 14)[0] == old_crc:
        struct.pack_into("<I", data, header + 14, crc)
    if target.flag_bits & 0x08:  # data descriptor after the data, signature optional
        position = start + size + (4 if data[start + size:start + size + 4] == b"PK\x07\x08" else 0)
        if struct.unpack_from("<I", data, position)[0] == old_crc:
            struct.pack_into("<I", data, position, crc)
    # The central directory's entry, walked from the end-of-directory record: a nested archive
    # inside a record (torch.export keeps its sample inputs as one) may hold the same name.
    end_of_directory = data.rfind(b"PK\x05\x06")
    entries, position = struct.unpack_from("<HxxxxI", data, end_of_directory + 10)
    for _ in range(entries):
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, position + 28)
        if struct.unpack_from("<I", data, position + 42)[0] == header:
            struct.pack_into("<I", data, position + 16, crc)
            break
        position += 46 + name_length + extra_length + comment_length
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        if archive.testzip() is not None:
            raise QuantizationError(f"{label}: could not rewrite {_SERIALIZATION_ID}")
    return bytes(data)


def _compile(model: nn.Module, example_inputs: tuple):
    """TorchScript of the model: scripted (keeps control flow) or else traced."""
    try:
        with _deterministic_scripting():
            return torch.jit.script(model)
    except Exception:  # noqa: BLE001 - not scriptable Python: tracing records one path
        return torch.jit.trace(model, example_inputs, check_trace=False)


def _same(expected, actual) -> bool:
    if isinstance(expected, (tuple, list)):
        return len(expected) == len(actual) and all(_same(e, a) for e, a in zip(expected, actual))
    return torch.equal(expected, actual)


def save_torchscript(int8_model: nn.Module, example_inputs: tuple, path, backend) -> None:
    """Save a TorchScript file that runs without the user's model class.

    Run it with `torch.backends.quantized.engine = backend` then `torch.jit.load(path)`.
    The file's bytes depend only on the int8 model (see _deterministic_scripting and
    _deterministic_serialization_id).
    """
    if backend not in FX_BACKENDS or _is_pt2e(int8_model):
        raise QuantizationError(
            f"save_torchscript: backend {backend!r} has no TorchScript file; "
            f"write its files with quant.write_artifacts")
    set_engine(backend)
    int8_model = int8_model.cpu().eval()
    with torch.no_grad(), _ao.quiet():
        try:
            scripted = _compile(int8_model, example_inputs)
        except Exception as error:
            raise QuantizationError(
                f"save_torchscript: {type(int8_model).__name__} cannot be scripted or traced: {error}"
            ) from error
        torch.jit.save(scripted, str(path))
        _deterministic_serialization_id(path)
        # A file that silently computes something else is worse than no file.
        expected = int8_model(*example_inputs)
        reloaded = torch.jit.load(str(path))(*example_inputs)
    if not _same(expected, reloaded):
        raise QuantizationError(f"save_torchscript: {path} does not reproduce the int8 model's output")


def _is_pt2e(model: nn.Module) -> bool:
    info = model.meta.get("quant_info") if isinstance(model, torch.fx.GraphModule) else None
    return info is not None and info.mode == "pt2e"


def state_dict_size_bytes(model: nn.Module) -> int:
    """Bytes of torch.save(model.state_dict()), measured in memory."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def latency_ms(model: nn.Module, batch, repeats: int = 20, warmup: int = 3) -> float:
    """Median single-thread forward time in milliseconds (one measurement at a time: quant.timing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return median_ms(lambda inputs: forward_quant(model, inputs), batch, repeats, warmup)
    finally:
        torch.set_num_threads(threads)
