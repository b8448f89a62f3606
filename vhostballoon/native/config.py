"""The config space's one owner (csrc/config.c)."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import NamedTuple

from .._native import ffi, lib

from ._base import NativeError, _ERRLEN, _errbuf, _errtext


# ---- the config space (csrc/config.c) ---------------------------------------------------


class ConfigAccessError(NativeError, ValueError):
    """A config read or write outside the space (the values are in the message)."""


@dataclass(frozen=True)
class ConfigValues:
    num_pages: int
    actual: int
    free_page_hint_cmd_id: int
    poison_val: int


class ConfigWrite(NamedTuple):
    """One logged change of actual, with num_pages of that moment (a tuple:
    a GiB ballooned logs 512 of them)."""

    old_actual: int
    new_actual: int
    num_pages: int


_CONFIG_LOG_BATCH = 4096


def at_target(num_pages: int, pages: int) -> bool:
    """The balloon is at the guest's target (csrc/config.c: the one definition)."""
    return bool(lib.vb_at_target(num_pages, pages))


class ConfigMailbox:
    """The balloon's config space, the one owner of its values (C, shared with
    the front-end reader thread and the inflate thread).  ``read()`` is the
    one way to read them; ``guest_write()`` applies the one rule for a
    guest's write and logs each change of actual for ``take_writes()``."""

    ACTUAL_CHANGED = lib.VB_CONFIG_ACTUAL_CHANGED
    AT_TARGET = lib.VB_CONFIG_AT_TARGET
    POISON_CHANGED = lib.VB_CONFIG_POISON_CHANGED
    REFUSED = lib.VB_CONFIG_REFUSED

    def __init__(self) -> None:
        config = lib.vb_config_new()
        if config == ffi.NULL:
            raise MemoryError("cannot allocate the config mailbox")
        self._config = ffi.gc(config, lib.vb_config_free)
        self._values = ffi.new("vb_config_values *")
        self._log = ffi.new("vb_config_write[]", _CONFIG_LOG_BATCH)
        self._packed = ffi.new("uint8_t[]", 64)

    def read(self) -> ConfigValues:
        v = self._values
        lib.vb_config_get(self._config, v)
        return ConfigValues(v.num_pages, v.actual, v.free_page_hint_cmd_id, v.poison_val)

    def pack(self) -> bytes:
        lib.vb_config_pack(self._config, self._packed)
        return bytes(ffi.buffer(self._packed, lib.VB_CONFIG_SIZE))

    def set_num_pages(self, num_pages: int) -> None:
        lib.vb_config_set_num_pages(self._config, num_pages)

    def set_actual(self, actual: int) -> None:
        lib.vb_config_set_actual(self._config, actual)

    def set_poison(self, poison_val: int) -> None:
        lib.vb_config_set_poison(self._config, poison_val)

    def guest_write(self, offset: int, data: bytes, *, keep_poison: bool = False) -> int:
        """The guest wrote data at offset: the ConfigMailbox bits of what changed."""
        err = _errbuf()
        rc = lib.vb_config_guest_write(self._config, offset, data, len(data), 1 if keep_poison else 0, err, _ERRLEN)
        if rc < 0:
            raise ConfigAccessError(_errtext(err))
        return rc

    def take_writes(self) -> list[ConfigWrite]:
        """Logged changes of actual, oldest first."""
        out: list[ConfigWrite] = []
        log = self._log
        while True:
            n = lib.vb_config_take_writes(self._config, log, _CONFIG_LOG_BATCH)
            words = array("I")  # three u32 per write
            words.frombytes(ffi.buffer(log, n * ffi.sizeof("vb_config_write")))
            out.extend(map(ConfigWrite._make, zip(words[0::3], words[1::3], words[2::3])))
            if n < _CONFIG_LOG_BATCH:
                return out
