"""vhostballoon-ctl for people (issue 14, item 6): the human summary of
``query``, ``--json``, the progress bar of ``balloon --wait``, no traceback
when the reader of its output goes away, and ``--sandbox`` one flag away
after a plain install. Real back-end, real control socket, real model guest,
``vhostballoon-ctl`` run as a process."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import trio

from backend_support import MiB, PAGE, SMALL_GUEST, wait_until
from vhostballoon.testing import model_guest

CTL = [sys.executable, "-m", "vhostballoon.ctl"]


async def run_ctl(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return await trio.run_process([*CTL, *args], capture_stdout=True, capture_stderr=True, check=False, **kwargs)


async def test_query_prints_a_short_summary_and_json_on_request(backend):
    async with model_guest(backend.socket_path, ram_size=SMALL_GUEST) as guest:
        backend.service.set_target(192 * MiB)
        await guest.wait_for_target(timeout=30)
        await wait_until(lambda: backend.service.query()["freed-bytes-measured"] >= 64 * MiB, timeout=10,
                         what="the host memory freed")
        result = await run_ctl("--socket-path", backend.socket_path, "query")
        assert result.returncode == 0, result.stderr.decode()
        lines = result.stdout.decode().splitlines()
        rows = {line[:17].strip(): line[19:] for line in lines}
        assert list(rows) == ["guest size", "target", "in the balloon", "host memory freed", "pending",
                              "features", "guest free memory"], lines
        assert rows["guest size"] == "192.0 MiB of 256.0 MiB RAM"
        assert rows["target"] == "192.0 MiB"
        assert rows["in the balloon"] == "64.0 MiB"
        assert rows["host memory freed"] == "64.0 MiB (measured)"
        assert rows["pending"] == "0 B" or rows["pending"].startswith("0")
        assert rows["features"] == "must_tell_host stats_vq deflate_on_oom reporting event_idx version_1"
        assert len(lines) == 7  # short: the whole reply is --json's job

        full = await run_ctl("--socket-path", backend.socket_path, "query", "--json")
        assert full.returncode == 0
        info = json.loads(full.stdout)
        assert info["actual"] == 192 * MiB and info["ballooned-bytes"] == 64 * MiB
        assert info == {**info, "target": 192 * MiB, "connected": True}


async def test_query_summary_without_a_guest(backend):
    result = await run_ctl("--socket-path", backend.socket_path, "query")
    assert result.returncode == 0
    assert result.stdout.decode().splitlines() == ["guest   no front-end connected", "target  none set"]


async def test_balloon_wait_shows_bytes_moved_rate_and_eta(backend):
    async with model_guest(backend.socket_path, ram_size=SMALL_GUEST) as guest:
        result = await run_ctl("--socket-path", backend.socket_path, "balloon", "64M", "--wait",
                               env={**os.environ, "COLUMNS": "160"})
        out, err = result.stdout.decode(), result.stderr.decode()
        assert result.returncode == 0, err
        assert out.splitlines()[0] == "target set: 64.0 MiB (67108864 bytes)"
        assert out.splitlines()[1].startswith("reached: guest has 64.0 MiB (67108864 bytes); host memory freed ")
        # the bar's last frame: what moved of the 192 MiB to move, a rate, a time left
        assert "inflating 256.0 MiB -> 64.0 MiB" in err
        assert "192.0/192.0 MiB" in err
        assert " MiB/s " in err or " GiB/s " in err or " KiB/s " in err
        assert err.rstrip().endswith("ETA 0 s")
        assert guest.actual_pages == (SMALL_GUEST - 64 * MiB) // PAGE


async def test_no_traceback_when_the_reader_is_gone(backend):
    """``vhostballoon-ctl ... | head`` once head has exited: the write fails
    with EPIPE; the tool ends quietly with 141 (128 + SIGPIPE), as a shell shows."""
    for args in (["query"], ["query", "--json"], ["stats"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader left before we wrote
        try:
            result = await trio.run_process([*CTL, "--socket-path", backend.socket_path, *args], stdout=write_end,
                                            capture_stderr=True, check=False)
        finally:
            os.close(write_end)
        assert result.returncode == 141, (args, result.stderr)
        assert result.stderr == b"", (args, result.stderr)

    # and the real thing: a pipeline into head
    shell = " ".join(CTL) + f" --socket-path {backend.socket_path} query --json | head -n 1"
    result = await trio.run_process(["bash", "-o", "pipefail", "-c", shell], capture_stdout=True,
                                    capture_stderr=True, check=False)
    assert result.stdout.decode() == "{\n"
    assert b"Traceback" not in result.stderr and b"BrokenPipe" not in result.stderr


def test_sandbox_binding_is_a_regular_dependency():
    """The README's plain install (``pip install .``) brings pyseccomp:
    no extra is needed for --sandbox."""
    requires = importlib.metadata.requires("vhostballoon")
    plain = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("pyseccomp") for r in plain), requires
    assert any(r.startswith("prometheus_client") for r in plain)
    assert any(r.startswith("rich") for r in plain)
