"""The operator's intent on disk, so that it survives a back-end restart.

One small JSON file per back-end, replaced atomically (write a temporary
file, fsync it, rename it over the old one, fsync the directory): a crash at
any moment leaves either the old or the new file, never a torn one. It is
written when the operator changes something, never per buffer.

What is kept here: the target, in ``state.json``.  The same directory holds
the balloon's page state (ballooned pages, pending partial huge pages, the
guest's ``actual``): ``pages.json`` and ``pages.journal``, written by
server/persist.py, which also says what a restart does and does not bring
back.  ``atomic_write`` is the one way both write a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

log = structlog.get_logger("vhostballoon.state")

STATE_FILE = "state.json"
STATE_VERSION = 1
# Seconds between page snapshots of a busy session (server/persist.py says why 5).
DEFAULT_SNAPSHOT_INTERVAL = 5.0


class StateError(Exception):
    pass


class StateStore:
    def __init__(self, directory: str | os.PathLike, *, snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL) -> None:
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE
        # How often a session rewrites its page snapshot when something
        # changed (server/persist.py); the journal covers the time between.
        self.snapshot_interval = snapshot_interval

    def load(self) -> dict:
        """The saved state, or {} when there is none. A damaged file is
        reported and ignored (renamed aside), never fatal."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            state = json.loads(raw)
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                raise ValueError(f"unexpected content (version {state.get('version') if isinstance(state, dict) else '?'})")
        except ValueError as exc:
            aside = self.path.with_suffix(".damaged")
            os.replace(self.path, aside)
            log.error("state file unreadable: ignored and kept aside", path=str(aside), error=str(exc))
            return {}
        return state

    def save(self, **fields) -> None:
        state = {"version": STATE_VERSION, **fields}
        atomic_write(self.path, json.dumps(state, indent=1).encode() + b"\n")


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: write a temporary file, fsync it,
    rename it over ``path``, fsync the directory.  A crash at any moment
    leaves the old file or the new one, never a torn one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
