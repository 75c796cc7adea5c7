"""Host buffers and file I/O for streaming conversion: small pages, recycled; direct writes.

A conversion moves every byte through a few pieces' worth of host memory. numpy backs arrays of
4 MiB and more with transparent huge pages (`madvise(MADV_HUGEPAGE)`), and copying out of
those into the page cache (every `write` of a converted piece) is several times slower than out
of small pages on the VMs measured (benchmarks/convert_memory.py); fresh memory also costs a
page fault and a zeroed page per 4 KiB. `empty` hands out arrays in anonymous maps advised
`MADV_NOHUGEPAGE`, and a map of at most POOLED_BYTES returns to a small free list when the last
array (or view) using it is gone, so the next piece of a similar size reuses its pages.

Converted data is written with `O_DIRECT` where the filesystem allows it (`open_direct`): from
the buffer to the disk, around the page cache. Buffered writes fill the page cache with the
whole output (allocating, and on the development VM faulting in, every page of it): 4 GiB
written in 16 MiB files took 5-7 CPU seconds buffered against 0.2 direct there, and the pages
would only evict what the host has cached. Direct writes need ALIGN-aligned addresses, offsets
and sizes; what is not aligned goes through the page cache.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import errno
import math
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from l4jax.errors import CheckpointError

SMALL_BYTES = 2**22  # below this numpy allocates (it advises huge pages from 4 MiB on)
POOLED_BYTES = 64 * 2**20  # maps up to this size are recycled
MAX_FREE = 4  # maps kept for reuse
_READ_BYTES = 2**30  # largest single read or write (Linux moves at most ~2 GiB per call)
ALIGN = 4096  # O_DIRECT alignment of addresses, file offsets and sizes
DIRECT = hasattr(os, "O_DIRECT")  # (tests turn it off to test the buffered path)
_free: list[mmap.mmap] = []
_lock = threading.RLock()  # (re-entered when GC runs `_give` inside `_take`)


class _Owner:
    """The base object of an array in `buffer`: alive as long as any view of it."""

    def __init__(self, buffer: mmap.mmap, nbytes: int):
        self._pointer = ctypes.c_char.from_buffer(buffer)
        address = ctypes.addressof(self._pointer)
        self.__array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
        }


def empty(shape: tuple[int, ...], dtype: Any, aligned: bool = False) -> np.ndarray:
    """`np.empty(shape, dtype)` in small-page memory, recycled when no longer used; from
    SMALL_BYTES on (or if `aligned`) page-aligned."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < SMALL_BYTES and not aligned:
        return np.empty(shape, dtype)
    buffer = _take(nbytes)
    owner = _Owner(buffer, nbytes)
    if len(buffer) <= POOLED_BYTES:
        weakref.finalize(owner, _give, buffer)
    return np.asarray(owner).view(dtype).reshape(shape)


def contiguous(array: np.ndarray, dtype: np.dtype, for_direct_write: bool = False) -> np.ndarray:
    """`array` as a C-contiguous array of `dtype`: itself when it is one, else a copy cast as
    `astype` casts. `for_direct_write`: also copied when a page-aligned copy could be written
    with O_DIRECT and `array` cannot (a large array of whole blocks at an unaligned address)."""
    movable = (
        for_direct_write
        and array.nbytes >= SMALL_BYTES
        and array.nbytes % ALIGN == 0
        and array.ctypes.data % ALIGN != 0
    )
    if array.dtype == dtype and array.flags.c_contiguous and not movable:
        return array
    out = empty(array.shape, dtype)
    np.copyto(out, array, casting="unsafe")
    return out


def pread(file: str | os.PathLike, array: np.ndarray, offset: int = 0, size: int | None = None):
    """Fill C-contiguous `array` with the bytes of `file` from `offset` (positioned reads, no
    map). `size`: the file's expected size. Raises OSError."""
    view = memoryview(array.reshape(-1).view(np.uint8))
    fd = os.open(file, os.O_RDONLY)
    try:
        if size is not None and os.fstat(fd).st_size != size:
            raise OSError(f"{os.fstat(fd).st_size} bytes, expected {size}")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done : done + _READ_BYTES]], offset + done)
            if n == 0:
                raise OSError("file ends early")
            done += n
    finally:
        os.close(fd)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory (a directory: its entries, e.g. files just created in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def misaligned(array: np.ndarray) -> bool:
    """Not writable with O_DIRECT: address or size not a multiple of ALIGN."""
    return bool(array.ctypes.data % ALIGN or array.nbytes % ALIGN)


def open_direct(path: str | os.PathLike) -> int | None:
    """An O_DIRECT write descriptor of existing file `path`, or None where that is refused."""
    if not DIRECT:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:  # (a filesystem without direct I/O, e.g. tmpfs)
            return None
        raise


def pwrite(fd: int, data: Any, offset: int) -> None:
    """Write all of `data` (bytes-like) at `offset` of `fd`."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + _READ_BYTES], offset + done)


def pwrite_direct(direct: int, fd: int, data: Any, offset: int) -> None:
    """Write `data` at `offset` through `direct` (an `open_direct` descriptor), or through
    `fd` (the same file, buffered) where the filesystem refuses the direct write: some accept
    the O_DIRECT open and then fail the write with EINVAL (alignment beyond ALIGN, FUSE)."""
    try:
        pwrite(direct, data, offset)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        pwrite(fd, data, offset)


def write_file(path: str | os.PathLike, data: np.ndarray) -> None:
    """A new file `path` holding C-contiguous `data` (written directly when it is aligned),
    fsynced. Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        direct = None if misaligned(data) else open_direct(path)
        try:
            if direct is None:
                pwrite(fd, data.reshape(-1).view(np.uint8), 0)
            else:
                pwrite_direct(direct, fd, data.reshape(-1).view(np.uint8), 0)
        finally:
            if direct is not None:
                os.close(direct)
        os.fsync(fd)
    finally:
        os.close(fd)


class Writes:
    """Writes run by `threads` background threads (the disk busy while the next piece is
    converted), at most `max_bytes` of their data in flight: `submit` waits for the oldest
    beyond that. A failed write raises CheckpointError naming its file (from `submit` or
    `wait`)."""

    def __init__(self, threads: int, max_bytes: int):
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "l4jax-write")
        self._pending: collections.deque[tuple[Any, int, str]] = collections.deque()
        self._bytes = 0
        self._max_bytes = max_bytes

    def submit(self, write: Callable[[], None], nbytes: int, file: Any) -> None:
        self._pending.append((self._pool.submit(write), nbytes, str(file)))
        self._bytes += nbytes
        while self._bytes > self._max_bytes:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes, file = self._pending.popleft()
        self._bytes -= nbytes
        try:
            future.result()
        except OSError as e:
            raise CheckpointError(f"{file}: write failed ({e})") from None

    def wait(self) -> None:
        while self._pending:
            self._wait_oldest()

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()

    def abort(self) -> None:
        """Wait out the writes in flight (so nothing lands after the output is removed)."""
        concurrent.futures.wait([future for future, _, _ in self._pending])
        self._pending.clear()
        self._pool.shutdown()


def map_file(file: str | os.PathLike, size: int) -> np.ndarray:
    """The bytes of `file` (expected `size`), mapped read-only (the page cache's own pages, no
    copy) until the array and its views are gone. Raises OSError."""
    fd = os.open(file, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size != size:
            raise OSError(f"{os.fstat(fd).st_size} bytes, expected {size}")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return np.frombuffer(mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ), np.uint8)
    finally:
        os.close(fd)


def _take(nbytes: int) -> mmap.mmap:
    with _lock:
        fits = [b for b in _free if nbytes <= len(b) <= 2 * nbytes]
        if fits:
            best = min(fits, key=len)
            _free.remove(best)
            return best
    buffer = mmap.mmap(-1, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # (Linux)
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return buffer


def _give(buffer: mmap.mmap) -> None:
    with _lock:
        _free.append(buffer)
        if len(_free) > MAX_FREE:
            _free.pop(0)
