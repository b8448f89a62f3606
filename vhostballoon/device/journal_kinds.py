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
    INFLATE = 1  # values: pages that became ballooned
    DEFLATE = 2  # values: pages that left the balloon
    COLLECT = 3  # no values: every collectable pending page was taken (and freed)
    ACTUAL = 4  # one value: the guest's actual (pages)
    COLLECT_BATCH = 5  # no values: the pending pages of plain shmem regions were taken (and freed)
