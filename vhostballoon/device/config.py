"""The virtio-balloon configuration space (virtio 1.2, 5.5.4): its layout.

All fields are le32 (the device is VERSION_1 only):

    num_pages              written by the device: pages the guest should give
    actual                 written by the driver: pages in the balloon now
    free_page_hint_cmd_id  FREE_PAGE_HINT only
    poison_val             PAGE_POISON only: the guest's poison pattern

The values live in one place, the C mailbox (``csrc/config.c``, read and
written through ``native.ConfigMailbox``), which also holds the rule for a
guest write.  The C side gets this layout from a header generated from this
file at build time, so this file uses the standard library only.
"""

from __future__ import annotations

# The fields in order, each le32.
CONFIG_FIELDS = ("num_pages", "actual", "free_page_hint_cmd_id", "poison_val")
CONFIG_OFFSETS = {name: 4 * i for i, name in enumerate(CONFIG_FIELDS)}
CONFIG_SIZE = 4 * len(CONFIG_FIELDS)  # 16; QEMU's config_size must equal it
NUM_PAGES_OFFSET = CONFIG_OFFSETS["num_pages"]
ACTUAL_OFFSET = CONFIG_OFFSETS["actual"]
FREE_PAGE_HINT_CMD_ID_OFFSET = CONFIG_OFFSETS["free_page_hint_cmd_id"]
POISON_OFFSET = CONFIG_OFFSETS["poison_val"]


class ConfigAccessError(ValueError):
    """A config read or write outside the 16-byte space."""


def check_access(offset: int, size: int) -> None:
    if size == 0 or offset < 0 or offset + size > CONFIG_SIZE:
        raise ConfigAccessError(
            f"config access offset {offset} size {size} is outside the {CONFIG_SIZE}-byte balloon config"
        )
