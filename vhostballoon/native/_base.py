"""What every part of the native face shares: the page size (from the C
core, which has it from ``device/queues.py``), the error classes, and the
error buffer of C calls."""

from __future__ import annotations

from .._native import ffi, lib

# Balloon PFNs are 4 KiB page numbers whatever the host page size; the C
# core has the shift from device/queues.py (PFN_SHIFT) through vb_gen.h.
PAGE_SHIFT = lib.VB_PAGE_SHIFT
PAGE_SIZE = 1 << PAGE_SHIFT

_ERRLEN = 512
# Descriptors one pop_ranges returns, and so the most one buffer may have:
# QEMU's virtqueue_pop refuses more than VIRTQUEUE_MAX_SIZE (1024) too.  A
# Linux reporting buffer has at most 32 (PAGE_REPORTING_CAPACITY), a stats
# buffer one.
MAX_RANGES_PER_POP = 1024
_DISCARD_METHODS = {0: "untried", 1: "fallocate", 2: "madvise"}

# What a region's fd lives on (vb.h VB_BACKING_*, from fstatfs f_type).
BACKING_KINDS = ("file", "shmem", "hugetlbfs")
_BACKING_CODES = {name: code for code, name in enumerate(BACKING_KINDS)}


class NativeError(Exception):
    """An operation of the native core was refused."""


class MemoryTableError(NativeError, ValueError):
    """A memory region was rejected or not found."""


class RingError(NativeError):
    """A virtqueue is malformed, or cannot be set up where the front-end says."""


def _errbuf():
    return ffi.new("char[]", _ERRLEN)


def _errtext(buf) -> str:
    return ffi.string(buf).decode("utf-8", "replace")
