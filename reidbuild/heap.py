"""glibc heap settings for a build: where large buffers come from, and handing freed memory back.

A build holds a few models' worth of weights at its peaks (PyTorch tensors, protobuf messages, onnxruntime
sessions), so it serves buffers of ``MMAP_THRESHOLD`` and more from their own mappings, returned to the
system when freed (``bound_heap``). That has a price in PyTorch inference: every activation of 4 MiB or more
is then a fresh mapping whose pages the kernel faults in and zeroes on first touch, once per layer and batch.
An R50 forward pass on 12 images took 0.9 s that way against 0.45 s with activations reused from the heap, so
PyTorch inference runs inside ``reusing_heap``: large buffers come from the heap while it runs, freed ones
stay there for the next layer (the top of the heap is not trimmed on every free either), and what it freed is
handed back (``malloc_trim``) when it ends. Without glibc (musl, macOS) all of this does nothing.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Iterator

MMAP_THRESHOLD = 4 << 20  # a build's setting (see ``bound_heap``)
REUSE_THRESHOLD = 1 << 30  # while PyTorch runs: activations of any realistic size come from the heap...
TRIM_THRESHOLD = 128 << 10  # glibc's default top-of-heap trim threshold (fixed once the mmap one is set)
_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3

_REUSERS = threading.Lock()  # mallopt is process-wide: counted, so nested or parallel users do not clash
_active = [0]


@functools.lru_cache(maxsize=1)
def libc() -> Any:
    """glibc through ctypes, or None where there is none (musl, macOS); looked up once (find_library runs
    ldconfig)."""
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None
    except OSError:
        return None


def bound_heap() -> None:
    """Serve allocations of ``MMAP_THRESHOLD`` and more from their own mappings, returned to the system when
    freed.

    glibc raises its mmap threshold (up to 32 MiB) each time such a block is freed, after which tensors and
    buffers of a few MB land in the heap, where freed ones leave holes ``malloc_trim`` cannot return: a full
    R50 build peaked ~50 MB higher that way. Setting the threshold also stops that adjustment."""
    lib = libc()
    if lib is not None:
        lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim() -> None:
    """Hand the free pages of the heap back to the system."""
    lib = libc()
    if lib is not None:
        lib.malloc_trim(0)


@contextlib.contextmanager
def reusing_heap() -> Iterator[None]:
    """Inside: large buffers come from the heap and are reused (PyTorch inference: no page faults per layer).
    After the last user leaves: ``MMAP_THRESHOLD`` again, and what was freed meanwhile goes back."""
    lib = libc()
    if lib is None:
        yield
        return
    with _REUSERS:
        _active[0] += 1
        if _active[0] == 1:
            lib.mallopt(_M_MMAP_THRESHOLD, REUSE_THRESHOLD)
            lib.mallopt(_M_TRIM_THRESHOLD, REUSE_THRESHOLD)  # ...and stay there when freed at its top
    try:
        yield
    finally:
        with _REUSERS:
            _active[0] -= 1
            if _active[0] == 0:
                lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                lib.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                lib.malloc_trim(0)
