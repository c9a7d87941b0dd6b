"""Safetensors files, read and written without the `safetensors` package.

Layout: an 8-byte little-endian header length N, N bytes of JSON
    {name: {"dtype": "BF16", "shape": [7168], "data_offsets": [begin, end]}, ..., "__metadata__": {...}}
then the data section, to which the offsets are relative. Reading maps the file (np.memmap) and hands
out views on it, so a shard costs no memory until a tensor is touched. Every field of the header is
checked against the file size before any data is read.
"""
import json
import math
import os

import ml_dtypes
import numpy as np

# fp8 is held as raw uint8 bit patterns (CuPy has no fp8 dtype); kernels/fp8.py decodes them.
DTYPES = {name: np.dtype(t) for name, t in {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": np.uint8, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_}.items()}
# For the writer: uint8 means U8 unless the caller tags the array as ("F8_E4M3", bits).
TAGS = {t: name for name, t in DTYPES.items() if name != "F8_E4M3"}


class CheckpointError(Exception):
    """A malformed checkpoint file or folder; the one-line message names the file, tensor and numbers."""


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true would pass isinstance(x, int)


class SafetensorsFile:
    def __init__(self, path):
        self.path = str(path)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
        if size < 8:
            raise CheckpointError(f"{path}: file has {size} bytes, fewer than the 8 of the header length")
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: header ({n} bytes) is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, not an object")
        meta = header.pop("__metadata__", {})  # free-form strings; nothing in it is needed to read tensors
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(f"{path}: __metadata__ is not an object of strings")

        self.data_size = size - 8 - n
        self._entries = {name: self._check(name, entry) for name, entry in header.items()}
        # No two tensors may share bytes: sorted by begin, each must end before the next one begins.
        spans = sorted((b, e, name) for name, (_, _, b, e) in self._entries.items() if e > b)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(f"{path}: tensors '{n0}' data_offsets [{b0}, {e0}] and '{n1}' "
                                      f"[{b1}, {e1}] overlap")
        # np.memmap cannot map zero bytes (a file holding only empty tensors).
        self._data = (np.memmap(path, np.uint8, "r", offset=8 + n, shape=(self.data_size,))
                      if self.data_size else np.zeros(0, np.uint8))

    def _check(self, name, entry):
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} has a header entry that is a JSON {type(entry).__name__}, "
                                  f"not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise CheckpointError(f"{where} has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where} shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
            raise CheckpointError(f"{where} data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CheckpointError(f"{where} data_offsets [{begin}, {end}] are not 0 <= begin <= end")
        if end > self.data_size:
            raise CheckpointError(f"{where} data_offsets [{begin}, {end}] run past the data section "
                                  f"({self.data_size} bytes)")
        need = DTYPES[dtype].itemsize * math.prod(shape)
        if end - begin != need:
            raise CheckpointError(f"{where} data_offsets [{begin}, {end}] hold {end - begin} bytes, "
                                  f"but {dtype} {shape} needs {need}")
        return dtype, tuple(shape), begin, end

    def _entry(self, name):
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        return self._entries[name]

    def names(self):
        return list(self._entries)

    def info(self, name):
        """(dtype tag, shape), e.g. ("F8_E4M3", (1536, 7168))."""
        dtype, shape, _, _ = self._entry(name)
        return dtype, shape

    def nbytes(self, name):
        _, _, begin, end = self._entry(name)
        return end - begin

    def get(self, name):
        """A read-only view on the mapped file, no copy: BF16 as ml_dtypes.bfloat16, F8_E4M3 as uint8 bits."""
        dtype, shape, begin, end = self._entry(name)
        return self._data[begin:end].view(DTYPES[dtype]).reshape(shape)

    def __contains__(self, name):
        return name in self._entries


def write_safetensors(path, tensors, metadata=None):
    """Write name -> array (or name -> ("F8_E4M3", uint8 bits)) as one safetensors file.

    The dtype tag follows the array's dtype. Output is deterministic: sorted JSON, and data ordered by
    item size (largest first), then name. With the header padded by spaces to a multiple of 8 bytes,
    that puts every tensor at a multiple of its own item size with no gaps (the reference reader
    refuses gaps). Arrays are written in this machine's byte order, little-endian on x86 and ARM.
    """
    arrays, entries = {}, {}
    for name in sorted(tensors):
        tag, arr = tensors[name] if isinstance(tensors[name], tuple) else (None, tensors[name])
        arr = np.asarray(arr, order="C")  # (not ascontiguousarray: it turns a 0-d array into 1-d)
        if tag is None and arr.dtype not in TAGS:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {arr.dtype}, which safetensors cannot store")
        tag = tag or TAGS[arr.dtype]
        if DTYPES.get(tag) != arr.dtype:
            raise CheckpointError(f"{path}: tensor '{name}' tagged {tag} must be {DTYPES.get(tag)}, "
                                  f"not {arr.dtype}")
        arrays[name], entries[name] = arr, (tag, arr.shape)
    write_safetensors_streaming(path, entries, arrays.__getitem__, metadata)


def write_safetensors_streaming(path, entries, make, metadata=None):
    """write_safetensors for tensors made one at a time: entries is name -> (dtype tag, shape), and
    make(name) returns that tensor's data, an array or an iterable of arrays whose bytes follow each other
    (row chunks of a large tensor). Only what make returns is in memory at once: this writes files far
    larger than RAM. Same layout and bytes as write_safetensors."""
    order = sorted(entries, key=lambda n: (-DTYPES[entries[n][0]].itemsize, n))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in order:
        tag, shape = entries[name]
        nbytes = DTYPES[tag].itemsize * math.prod(shape)
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            tag, shape = entries[name]
            data = make(name)
            chunks = [data] if isinstance(data, np.ndarray) else data
            written = 0
            for chunk in chunks:
                chunk = np.asarray(chunk, order="C")
                if chunk.dtype != DTYPES[tag]:
                    raise CheckpointError(f"{path}: tensor '{name}' tagged {tag} must be {DTYPES[tag]}, "
                                          f"not {chunk.dtype}")
                f.write(chunk.reshape(-1).view(np.uint8).data)  # no copy (a 0-d array becomes 1-d)
                written += chunk.nbytes
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if written != want:
                raise CheckpointError(f"{path}: tensor '{name}' {tag} {list(shape)} needs {want} bytes, "
                                      f"{written} were made")
