"""Kinds of the page journal's records: the one definition.

The journal (layout in ``vhostballoon/server/persist.py``) is appended to by
the C queue threads and by the session, and replayed by persist.py on
restore, so the C runtime reads these numbers from a header generated at
build time from this file (``csrc/build_native.py``).  Standard library only:
the build loads this file by path, without the package's dependencies.
"""

from __future__ import annotations

from enum import IntEnum


class JournalKind(IntEnum):
    # Kinds 1 and 2 (le32 PFN lists) were written before the journal took
    # ranges (persist.py format 2); they are still replayed, never written.
    INFLATE = 1  # values: le32 PFNs that became ballooned
    DEFLATE = 2  # values: le32 PFNs that left the balloon
    COLLECT = 3  # no values: every collectable pending page was taken (and freed)
    ACTUAL = 4  # one value: the guest's actual (pages)
    COLLECT_BATCH = 5  # no values: the pending pages of plain shmem regions were taken (and freed)
    INFLATE_RANGES = 6  # values: ranges (le64 gpa, le64 len) whose pages became ballooned
    DEFLATE_RANGES = 7  # values: ranges (le64 gpa, le64 len) whose pages left the balloon
