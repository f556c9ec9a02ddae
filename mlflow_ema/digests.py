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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from mlflow_ema.checkpoint import WeightsReader

_CHUNK = 1 << 20  # bytes read at a time to fill a gap
# Hashing threads: sha256 runs at about 1.2 GB/s a core; beyond a few, reading is the limit.
_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Chunks hashed per job: fewer hand-offs between threads, and the main thread runs that far
# ahead of the hashing before it waits. Each member has twice as many chunk buffers.
_CHUNKS_PER_JOB = 2


class FileDigest:
    """The sha256 of one file, fed with byte ranges in increasing order of offset: a range
    (or its part) already hashed is skipped, a gap before it is read from the file."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.position = 0  # bytes [0, position) are hashed
        self._sha = hashlib.sha256()
        self._fd: int | None = None

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
        try:
            self._read_until(None)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        return self._sha.hexdigest()

    def _read_until(self, end: int | None) -> None:
        """Hash the file's bytes from ``position`` to ``end`` (None: its end)."""
        if self._fd is None:
            self._fd = os.open(self.file, os.O_RDONLY)
        while end is None or self.position < end:
            size = _CHUNK if end is None else min(_CHUNK, end - self.position)
            data = os.pread(self._fd, size, self.position)
            if not data:
                return
            self._sha.update(data)
            self.position += len(data)


class DigestWorkers:
    """Feeds FileDigests on worker threads. A digest is always fed by the same worker, so its
    ranges arrive in the order they were read; :meth:`submit` sends one batch per worker."""

    def __init__(self, workers: int = _WORKERS) -> None:
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix="mlflow-ema-sha256") for _ in range(workers)]

    def __len__(self) -> int:
        return len(self._pools)

    def worker_of(self, member: int) -> int:
        return member % len(self._pools)

    def submit(self, batches: list[list[tuple[FileDigest, int, memoryview]]]) -> list[Future]:
        """One job per worker: feed its ranges in order. The buffers must stay untouched
        until the returned futures are done."""
        return [self._pools[i].submit(_feed_all, batch) for i, batch in enumerate(batches) if batch]

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)


def _feed_all(batch: list[tuple[FileDigest, int, memoryview]]) -> None:
    for digest, offset, data in batch:
        digest.feed(offset, data)


class MemberReads:
    """The members' chunks of a tensor, each read into a buffer of the member's own. With
    ``verify``, the bytes read are hashed on worker threads while the next chunks are read
    and summed: each member's buffers are used in turn, and a buffer is reused only once the
    hashing of what it held is done."""

    def __init__(self, readers: list[WeightsReader], *, verify: bool, chunk_bytes: int) -> None:
        self.readers = readers
        turns = 2 * _CHUNKS_PER_JOB
        self._buffers = [[torch.empty(chunk_bytes, dtype=torch.uint8) for _ in range(turns)] for _ in readers]
        self._turn = 0  # which of each member's buffers this chunk is read into
        self._workers = DigestWorkers() if verify else None
        self._digests: list[dict[str, FileDigest]] = [{} for _ in readers]  # file name -> its digest
        self._batches: list[list[tuple[FileDigest, int, memoryview]]] = [[] for _ in range(_WORKERS)]
        self._hashing: list[Future] = []  # the previous chunk's jobs: their buffers are read next

    def read(self, member: int, name: str, first: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        """Elements ``first`` to ``first + count`` of ``name`` in ``member``'s checkpoint."""
        raw = self._buffers[member][self._turn][: count * dtype.itemsize]
        reader = self.readers[member]
        tensor = reader.read(name, first, count, out=raw.view(dtype))
        if self._workers is not None:
            file, offset = reader.locate(name, first)
            digest = self._digests[member].get(file)
            if digest is None:
                digest = self._digests[member][file] = FileDigest(reader.path / file)
            self._batches[self._workers.worker_of(member)].append((digest, offset, memoryview(raw.numpy())))
        return tensor

    def chunk_done(self) -> None:
        """This chunk is summed. Every ``_CHUNKS_PER_JOB`` chunks, their bytes go to the
        workers, which hash them while the next ones are read into the other half of the
        buffers (once the workers are done with that half)."""
        if self._workers is None:
            return
        self._turn = (self._turn + 1) % len(self._buffers[0])
        if self._turn % _CHUNKS_PER_JOB == 0:
            for job in self._hashing:
                job.result()
            self._hashing = self._workers.submit(self._batches)
            self._batches = [[] for _ in range(_WORKERS)]

    def finish(self) -> None:
        """Every chunk is read: wait until the workers have hashed them all."""
        if self._workers is not None:
            self._hashing += self._workers.submit(self._batches)
            self._batches = [[] for _ in range(_WORKERS)]
            for job in self._hashing:
                job.result()

    def hexdigest(self, member: int, file: str) -> str:
        """The sha256 of ``member``'s ``file``, after :meth:`finish`: the bytes the averaging
        did not read are read now (threads may ask for different files at once)."""
        digest = self._digests[member].get(file) or FileDigest(self.readers[member].path / file)
        return digest.hexdigest()

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
