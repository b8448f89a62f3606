"""The host kernel's own figures and knobs, for tests, benchmarks and fault
scripts: /proc/meminfo, /proc/vmstat, and shmem THP switched for a while."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["meminfo", "vmstat", "shmem_thp", "sysfs_choice", "THP_SYSFS"]

# Linux Documentation/admin-guide/mm/transhuge.rst: the THP knobs, shmem's
# among them, and hpage_pmd_size (the size of a PMD-mapped huge page).
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage"


def meminfo(key: str) -> int:
    """A /proc/meminfo figure: bytes for kB lines, a count for HugePages_*."""
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            if name == key:
                parts = value.split()
                return int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    raise KeyError(key)


def smaps_total(pid: int | str, path_part: str, field: str) -> int:
    """Sum of ``field`` (bytes) over the mappings of pid whose path contains
    path_part (e.g. ``ShmemPmdMapped`` of guest RAM: THPs in use)."""
    total, current = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                current = path_part in line
            elif current and line.startswith(field + ":"):
                total += int(line.split()[1]) * 1024
    return total


def vmstat(key: str) -> int:
    """A /proc/vmstat counter (e.g. thp_split_page)."""
    with open("/proc/vmstat") as f:
        for line in f:
            name, value = line.split()
            if name == key:
                return int(value)
    raise KeyError(key)


def sysfs_choice(path: str) -> str | None:
    """The selected value of a sysfs choice file ("always [advise] never"), or
    None where the file is missing or unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            selected = re.search(r"\[([\w-]+)\]", f.read())
    except OSError:
        return None
    return selected.group(1) if selected else None


def _pmd_size_knob(name: str) -> str | None:
    """The PMD size's own knob ``hugepages-<PMD size>kB/name`` (newer
    kernels have one per THP size); None where this kernel has none."""
    try:
        with open(os.path.join(THP_SYSFS, "hpage_pmd_size"), encoding="ascii") as f:
            pmd_kib = int(f.read()) >> 10
    except (OSError, ValueError):
        return None
    path = os.path.join(THP_SYSFS, f"hugepages-{pmd_kib}kB", name)
    return path if os.path.exists(path) else None


@contextmanager
def shmem_thp(value: str) -> Iterator[None]:
    """Set shmem THP (the top-level knob, and the PMD size's own knob on
    "inherit") to ``value``; what was there before comes back afterwards.
    Raises PermissionError where sysfs is not writable."""
    top = os.path.join(THP_SYSFS, "shmem_enabled")
    per_size = _pmd_size_knob("shmem_enabled")
    wanted = [(top, value)] + ([(per_size, "inherit")] if per_size else [])
    saved = []
    try:
        for path, setting in wanted:
            old = sysfs_choice(path)
            saved.append((path, old))
            if old != setting:
                with open(path, "w") as f:
                    f.write(setting)
        yield
    finally:
        for path, old in reversed(saved):
            if old is not None:
                with open(path, "w") as f:
                    f.write(old)


NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


class HugePagesUnavailable(RuntimeError):
    """Persistent huge pages could not be reserved here (the reason is the message)."""


@contextmanager
def reserved_huge_pages(count: int) -> Iterator[None]:
    """``count`` more persistent huge pages of the default size in
    ``nr_hugepages`` while inside, the previous value restored after; raises
    HugePagesUnavailable, saying why, when the kernel will not give them."""
    try:
        with open(NR_HUGEPAGES) as f:
            old = int(f.read())
    except OSError as exc:
        raise HugePagesUnavailable(f"no hugetlbfs here: {exc}") from None
    try:
        try:
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(old + count))
        except OSError as exc:
            raise HugePagesUnavailable(f"cannot reserve huge pages: writing {NR_HUGEPAGES}: {exc.strerror}") from None
        if meminfo("HugePages_Free") < count:
            raise HugePagesUnavailable(
                f"cannot reserve huge pages: asked for {count} more, HugePages_Free is {meminfo('HugePages_Free')}"
            )
        yield
    finally:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(old))
