"""A lean GGUF file reader: the metadata as Python values and every tensor as a read-only memory map
of its raw bytes. The gguf package's reader builds a numpy view per array element, which takes
seconds for a 150K-token vocabulary; here numeric arrays are one np.frombuffer each and string
arrays one pass over the bytes.

Layout (little-endian): "GGUF", version u32, tensor count u64, key-value count u64; key-values
(string key, u32 type, value); tensor infos (string name, u32 n_dims, u64 dims[n_dims] fastest
first, u32 type, u64 offset); padding to `general.alignment` (32); the tensor data, each tensor at
its offset from there. A string is a u64 length and that many UTF-8 bytes; an array is a u32
element type, a u64 count and the elements.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value type -> numpy dtype of a scalar or array element (8: string, 9: array)
_NUMERIC = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
            7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]            # GGUF order: the fastest dim first
    tensor_type: GGMLQuantizationType
    n_bytes: int
    data: np.ndarray                  # uint8 memory map, (rows, bytes per row)


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        mv = memoryview(self.buf)
        self._mv, self._at = mv, 0
        if bytes(mv[:4]) != b"GGUF":
            raise ValueError(f"magic {bytes(mv[:4])!r}, expected b'GGUF'")
        self._at = 4
        version, n_tensors, n_kv = self._unpack("<IQQ")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (2 or later)")
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            qtype, offset = self._unpack("<IQ")
            infos.append((name, dims, qtype, offset))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._at // align) * align
        self.tensors: list[TensorInfo] = []
        for name, dims, qtype, offset in infos:
            t = GGMLQuantizationType(qtype)
            block, size = GGML_QUANT_SIZES[t]
            row_bytes = dims[0] // block * size
            rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
            n_bytes = row_bytes * rows
            lo = start + offset
            if lo + n_bytes > len(self.buf):
                raise ValueError(f"tensor '{name}' runs past the end of the file: it is truncated")
            self.tensors.append(TensorInfo(name, tuple(dims), t, n_bytes,
                                           self.buf[lo:lo + n_bytes].reshape(rows, row_bytes)))

    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self._mv, self._at)
        self._at += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        s = bytes(self._mv[self._at:self._at + n]).decode("utf-8", errors="replace")
        self._at += n
        return s

    def _value(self, vtype: int):
        if vtype == 8:
            return self._string()
        if vtype in _NUMERIC:
            dt = np.dtype(_NUMERIC[vtype])
            v = np.frombuffer(self._mv, dtype=dt, count=1, offset=self._at)[0].item()   # sync: none, numpy on the file's bytes
            self._at += dt.itemsize
            return v
        if vtype != 9:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, count = self._unpack("<IQ")
        if etype == 8:
            return [self._string() for _ in range(count)]
        if etype == 9:
            return [self._value(9) for _ in range(count)]
        dt = np.dtype(_NUMERIC[etype])
        arr = np.frombuffer(self._mv, dtype=dt, count=count, offset=self._at)
        self._at += dt.itemsize * count
        return arr.tolist()                              # sync: none, numpy on the file's bytes (loading)
