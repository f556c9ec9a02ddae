"""Writing a safetensors file and its sha256 in one pass.

``safetensors.torch.save_file`` writes the file, and the manifest's sha256 then took a
second pass reading it back. Here the file is written block by block, each block hashed on a
worker thread while it is written (both release the GIL), so the digest costs no extra pass
and little extra time (:class:`mlflow_ema.workers.Worker`: a plain thread, which still works
while the interpreter exits, when the last checkpoints of a run are written). The bytes are those ``save_file`` writes (safetensors 0.4 to 0.8; a
test compares them): the header is compact JSON with ``__metadata__`` first, then the
tensors sorted by dtype in the library's order and by name, padded with spaces to a
multiple of 8, and the data in the same order.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from mlflow_ema.workers import Worker

# Torch dtype -> its safetensors name, in the order safetensors lays tensors out (the
# reverse order of its Dtype enum), then by name.
_LAYOUT_ORDER = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
    torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_RANK = {dtype: i for i, dtype in enumerate(_LAYOUT_ORDER)}
_BLOCK = 8 << 20  # bytes written (and hashed) at a time


def write_safetensors(
    file: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Write contiguous CPU ``tensors`` (no two sharing memory) to a new ``file`` as
    safetensors; returns ``{"sha256": hex, "bytes": size}`` of what was written."""
    for name, t in tensors.items():
        if t.dtype not in _RANK:
            raise TypeError(
                f"{name!r} is {str(t.dtype).removeprefix('torch.')}, which safetensors cannot store"
            )
    order = sorted(tensors, key=lambda name: (_RANK[tensors[name].dtype], name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _LAYOUT_ORDER[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    digest = hashlib.sha256(prefix)
    hasher = Worker()
    try:
        with open(file, "xb") as f:
            f.write(prefix)
            jobs = []
            for block in _blocks(tensors, order):  # the tensors stay as they are: hashing may lag writing
                jobs.append(hasher.submit(digest.update, block))
                f.write(block)
        for job in jobs:
            job.result()
    finally:
        hasher.close()
    return {"sha256": digest.hexdigest(), "bytes": len(prefix) + offset}


def _blocks(tensors: Mapping[str, torch.Tensor], order: list[str]) -> Iterator[memoryview]:
    for name in order:
        data = _bytes_of(tensors[name])
        for lo in range(0, len(data), _BLOCK):
            yield data[lo : lo + _BLOCK]


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
