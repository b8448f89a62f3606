"""The virtio-balloon configuration space (virtio 1.2, 5.5.4): access rules.

All fields are le32 (the device is VERSION_1 only):

    num_pages              written by the device: pages the guest should give
    actual                 written by the driver: pages in the balloon now
    free_page_hint_cmd_id  FREE_PAGE_HINT only
    poison_val             PAGE_POISON only: the guest's poison pattern

Where they lie is written once, in ``config_layout.py`` (the C side gets it
from the header generated at build time).  The values live in one place, the
C mailbox (``csrc/config.c``, read and written through
``native.ConfigMailbox``), which also holds the rule for a guest write.
"""

from __future__ import annotations

from .config_layout import (
    ACTUAL_OFFSET,
    CONFIG_SIZE,
    FREE_PAGE_HINT_CMD_ID_OFFSET,
    NUM_PAGES_OFFSET,
    POISON_OFFSET,
)

# Re-exported: the layout's one home is config_layout.
__all__ = [
    "ACTUAL_OFFSET",
    "CONFIG_SIZE",
    "FREE_PAGE_HINT_CMD_ID_OFFSET",
    "NUM_PAGES_OFFSET",
    "POISON_OFFSET",
    "ConfigAccessError",
    "check_access",
]


class ConfigAccessError(ValueError):
    """A config read or write outside the 16-byte space."""


def check_access(offset: int, size: int) -> None:
    if size == 0 or offset < 0 or offset + size > CONFIG_SIZE:
        raise ConfigAccessError(
            f"config access offset {offset} size {size} is outside the {CONFIG_SIZE}-byte balloon config"
        )
