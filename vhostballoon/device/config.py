"""The virtio-balloon configuration space (virtio 1.2, 5.5.4).

All fields are le32 (the device is VERSION_1 only):

    num_pages              written by the device: pages the guest should give
    actual                 written by the driver: pages in the balloon now
    free_page_hint_cmd_id  FREE_PAGE_HINT only
    poison_val             PAGE_POISON only: the guest's poison pattern
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from construct import Int32ul, Struct

from .config_layout import ACTUAL_OFFSET, CONFIG_SIZE, POISON_OFFSET  # the one home of the numbers

CONFIG_LAYOUT = Struct(
    "num_pages" / Int32ul,
    "actual" / Int32ul,
    "free_page_hint_cmd_id" / Int32ul,
    "poison_val" / Int32ul,
)
assert CONFIG_LAYOUT.sizeof() == CONFIG_SIZE
# Read and written once per guest buffer (GET_CONFIG, SET_CONFIG): packed
# with the struct module, the layout above, checked equal here.
_CONFIG_FAST = struct.Struct("<IIII")
assert CONFIG_LAYOUT.parse(_CONFIG_FAST.pack(1, 2, 3, 4)) == dict(
    num_pages=1, actual=2, free_page_hint_cmd_id=3, poison_val=4
)


class ConfigAccessError(ValueError):
    """A config read or write outside the 16-byte space."""


@dataclass
class BalloonConfig:
    num_pages: int = 0
    actual: int = 0
    free_page_hint_cmd_id: int = 0
    poison_val: int = 0

    def pack(self) -> bytes:
        return _CONFIG_FAST.pack(self.num_pages, self.actual, self.free_page_hint_cmd_id, self.poison_val)

    @classmethod
    def unpack(cls, data: bytes) -> "BalloonConfig":
        return cls(*_CONFIG_FAST.unpack(data))


def check_access(offset: int, size: int) -> None:
    if size == 0 or offset < 0 or offset + size > CONFIG_SIZE:
        raise ConfigAccessError(
            f"config access offset {offset} size {size} is outside the {CONFIG_SIZE}-byte balloon config"
        )
