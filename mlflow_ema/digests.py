"""sha256 of checkpoint files from the bytes the averaging reads anyway.

Verifying a member used to be a pass over its files before the averaging's own pass. Here
the averaging reads each member's chunk into a buffer of its own and hands the bytes to a
worker thread that feeds the file's sha256 (hashlib releases the GIL) while the main thread
sums: the arithmetic and the hashing overlap, and every byte is read once. Bytes the
averaging never reads (the header, integer buffers taken from one member only, a layout
read out of order) are read from the file by the worker, so each digest still covers the
whole file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from mlflow_ema.checkpoint import WeightsReader
from mlflow_ema.workers import Job, Worker

_CHUNK = 1 << 20  # bytes read at a time to fill a gap
# Hashing threads: sha256 runs at about 1.2 GB/s a core; beyond a few, reading is the limit.
_WORKERS = max(1, min(4, os.cpu_count() or 1))


class FileDigest:
    """The sha256 of one file, fed with byte ranges in increasing order of offset: a range
    (or its part) already hashed is skipped, a gap before it is read from the file."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.position = 0  # bytes [0, position) are hashed
        self._sha = hashlib.sha256()

    def feed(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        if end <= self.position:
            return
        if offset > self.position:
            self._read_until(offset)
        self._sha.update(data[self.position - offset :])
        self.position = end

    def hexdigest(self) -> str:
        """The digest of the whole file (the rest is read from it), once fed."""
        self._read_until(None)
        return self._sha.hexdigest()

    def _read_until(self, end: int | None) -> None:
        """Hash the file's bytes from ``position`` to ``end`` (None: its end). The file is
        opened for this read only: a digest per member file waits for the end, and holding
        each one's file open would take a descriptor per file of every member."""
        fd = os.open(self.file, os.O_RDONLY)
        try:
            while end is None or self.position < end:
                size = _CHUNK if end is None else min(_CHUNK, end - self.position)
                data = os.pread(fd, size, self.position)
                if not data:
                    return
                self._sha.update(data)
                self.position += len(data)
        finally:
            os.close(fd)


class DigestWorkers:
    """Feeds FileDigests on worker threads. A digest is always fed by the same worker, so its
    ranges arrive in the order they were read; :meth:`submit` sends one batch per worker."""

    def __init__(self, workers: int = _WORKERS) -> None:
        self._workers = [Worker() for _ in range(workers)]

    def __len__(self) -> int:
        return len(self._workers)

    def worker_of(self, member: int) -> int:
        return member % len(self._workers)

    def submit(self, batches: list[list[tuple[FileDigest, int, memoryview]]]) -> list[Job]:
        """One job per worker: feed its ranges in order. The buffers must stay untouched
        until the returned jobs are done."""
        return [self._workers[i].submit(_feed_all, batch) for i, batch in enumerate(batches) if batch]

    def close(self) -> None:
        for worker in self._workers:
            worker.close()


def _feed_all(batch: list[tuple[FileDigest, int, memoryview]]) -> None:
    for digest, offset, data in batch:
        digest.feed(offset, data)


class MemberReads:
    """Every member's part of a tensor, read into buffers of the member's own: consecutive
    parts are packed one after the other, so the bytes of consecutive tensors stay one
    range. With ``verify``, each member has two buffers used in turn: when one is full its
    ranges go to the workers, which hash them while the other fills, and a buffer is
    refilled only once the hashing of what it held is done. The members read alike (same
    tensors, same sizes), so they fill their buffers alike."""

    def __init__(self, readers: list[WeightsReader], *, verify: bool, buffer_bytes: int) -> None:
        self.readers = readers
        self._size = buffer_bytes
        turns = 2 if verify else 1
        self._buffers = [
            [torch.empty(buffer_bytes, dtype=torch.uint8) for _ in range(turns)] for _ in readers
        ]
        self._bytes = [[memoryview(b.numpy()) for b in buffers] for buffers in self._buffers]
        self._typed: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}  # a buffer seen as a dtype
        self._turn = 0  # which buffer of each member is being filled
        self._fill = 0  # bytes of it in use
        self._workers = DigestWorkers() if verify else None
        self._digests: list[dict[str, FileDigest]] = [{} for _ in readers]  # file name -> its digest
        self._ranges: list[list[list]] = [[] for _ in readers]  # [file, offset, start, length] read this turn
        self._hashing: list[list[Job]] = [[] for _ in range(turns)]  # jobs hashing each buffer

    def read(self, name: str, first: int, count: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """Elements ``first`` to ``first + count`` of ``name``, from every member."""
        size = count * dtype.itemsize
        start = -(-self._fill // dtype.itemsize) * dtype.itemsize  # aligned for the dtype's view
        if start + size > self._size:
            self._next_turn()
            start = 0
        if size > self._size:
            raise ValueError(f"a read of {size} bytes does not fit the {self._size}-byte buffers")
        self._fill = start + size
        parts = []
        for member, reader in enumerate(self.readers):
            reader.read_into(name, first, self._bytes[member][self._turn][start : start + size])
            parts.append(self._typed_buffer(member, dtype)[start // dtype.itemsize :][:count])
            if self._workers is not None:
                self._note(member, *reader.locate(name, first), start, size)
        return parts

    def _typed_buffer(self, member: int, dtype: torch.dtype) -> torch.Tensor:
        key = (member, self._turn, dtype)
        if key not in self._typed:
            self._typed[key] = self._buffers[member][self._turn].view(dtype)
        return self._typed[key]

    def _note(self, member: int, file: str, offset: int, start: int, size: int) -> None:
        """Member's bytes ``[offset, offset + size)`` of ``file`` are at ``start`` in its buffer."""
        ranges = self._ranges[member]
        if ranges:
            last_file, last_offset, last_start, last_size = ranges[-1]
            if last_file == file and last_offset + last_size == offset and last_start + last_size == start:
                ranges[-1][3] += size  # follows the last range in the file and in the buffer: one range
                return
        ranges.append([file, offset, start, size])

    def _next_turn(self) -> None:
        """The buffers are full: hash them (verifying) and fill the other ones, once free."""
        self._fill = 0
        if self._workers is None:
            return  # every part in the buffers is summed already
        self._submit()
        self._turn ^= 1
        for job in self._hashing[self._turn]:
            job.result()

    def _submit(self) -> None:
        batches: list[list[tuple[FileDigest, int, memoryview]]] = [[] for _ in range(len(self._workers))]
        for member, ranges in enumerate(self._ranges):
            view = self._bytes[member][self._turn]
            for file, offset, start, size in ranges:
                digest = self._digests[member].get(file)
                if digest is None:
                    digest = self._digests[member][file] = FileDigest(self.readers[member].path / file)
                batches[self._workers.worker_of(member)].append((digest, offset, view[start : start + size]))
            ranges.clear()
        self._hashing[self._turn] = self._workers.submit(batches)

    def finish(self) -> None:
        """Every part is read: wait until the workers have hashed them all."""
        if self._workers is not None:
            self._submit()
            for job in self._hashing[0] + self._hashing[1]:
                job.result()

    def hexdigest(self, member: int, file: str) -> str:
        """The sha256 of ``member``'s ``file``, after :meth:`finish`: the bytes the averaging
        did not read are read now (threads may ask for different files at once)."""
        digest = self._digests[member].get(file) or FileDigest(self.readers[member].path / file)
        return digest.hexdigest()

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
