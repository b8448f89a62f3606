"""--metrics-address: /metrics from a real daemon process over real TCP on
loopback, parsed with prometheus_client's own parser, against the figures
query-balloon returns at the same moment (issue 14, item 1)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from backend_support import MiB, SMALL_GUEST, wait_until
from vhostballoon.server.metrics import parse_address
from vhostballoon.testing import model_guest

DAEMON = [sys.executable, "-m", "vhostballoon"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def query(control: str) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(control)
        s.sendall(b'{"execute": "query-balloon"}\n')
        return json.loads(s.makefile().readline())["return"]


@pytest.fixture
async def metrics_daemon(sock_dir):
    port = free_port()
    sock = os.path.join(sock_dir, "vb.sock")
    log_path = os.path.join(sock_dir, "daemon.log")
    with open(log_path, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            [*DAEMON, "--socket-path", sock, "--state-dir", "none", "--metrics-address", f"127.0.0.1:{port}",
             "--name", "vm-a", "--stats-interval", "1"],
            stdout=log_file, stderr=log_file)
    try:
        await wait_until(lambda: process.returncode is not None or os.path.exists(sock + ".ctl"), timeout=20,
                         what="the daemon to listen")
        assert process.returncode is None, open(log_path).read()
        yield sock, port
    finally:
        process.terminate()
        with trio.fail_after(10):
            assert await process.wait() == 0


V = (("vm", "vm-a"),)


async def test_metrics_match_query_balloon(metrics_daemon):
    sock, port = metrics_daemon
    idle = await trio.to_thread.run_sync(scrape, port)
    assert idle[("vhostballoon_connected", V)] == 0
    assert ("vhostballoon_actual_bytes", V) not in idle  # no guest: no actual
    async with model_guest(sock, ram_size=SMALL_GUEST) as guest:
        await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "vhostballoon.ctl", "--socket-path", sock, "balloon", "160M", "--wait"],
            check=True, capture_output=True))
        await wait_until(lambda: query(sock + ".ctl")["guest-stats"]["updates"] >= 1, timeout=10,
                         what="guest statistics")
        m = await trio.to_thread.run_sync(scrape, port)
        info = query(sock + ".ctl")
        assert m[("vhostballoon_connected", V)] == 1
        assert m[("vhostballoon_actual_bytes", V)] == info["actual"] == 160 * MiB
        assert m[("vhostballoon_target_bytes", V)] == 160 * MiB
        assert m[("vhostballoon_guest_ram_bytes", V)] == SMALL_GUEST
        assert m[("vhostballoon_ballooned_bytes", V)] == info["ballooned-bytes"] == 96 * MiB
        assert m[("vhostballoon_freed_measured_bytes", V)] == info["freed-bytes-measured"] >= 96 * MiB
        assert m[("vhostballoon_inflate_buffers_total", V)] == info["inflate-buffers"] > 0
        assert m[("vhostballoon_thp_splits_total", V)] == info["thp-splits"]
        assert m[("vhostballoon_ballooned_pages", (("via", "pfn"),) + V)] == 96 * MiB // 4096
        assert m[("vhostballoon_ballooned_pages", (("via", "range"),) + V)] == 0
        assert m[("vhostballoon_guest_free_memory_bytes", V)] > 0
        assert 0 <= m[("vhostballoon_guest_stats_age_seconds", V)] < 5
        assert m[("vhostballoon_sessions_served_total", V)] == 1
        # The buffers' service times, as a histogram: every page-moving buffer
        # counted once (the +Inf bucket), the buckets cumulative, a sum.
        buffers = info["inflate-buffers"] + info["deflate-buffers"]
        assert m[("vhostballoon_buffer_service_seconds_count", V)] == buffers > 0
        assert m[("vhostballoon_buffer_service_seconds_bucket", (("le", "+Inf"),) + V)] == buffers
        bounds = sorted((float(dict(labels)["le"]), value) for (name, labels), value in m.items()
                        if name == "vhostballoon_buffer_service_seconds_bucket")
        assert [v for _, v in bounds] == sorted(v for _, v in bounds)  # cumulative
        assert bounds[0][0] == 1e-06 and sum(info["buffer-service-time"]["counts"]) == buffers
        assert 0 < m[("vhostballoon_buffer_service_seconds_sum", V)] < buffers * 0.1
        # every sample carries the vm label; names follow the conventions
        for name, labels in m:
            assert dict(labels)["vm"] == "vm-a"
            assert name.startswith("vhostballoon_")
        assert guest.actual_pages == 96 * MiB // 4096


async def test_metrics_http_edges(metrics_daemon):
    sock, port = metrics_daemon

    def get(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert await trio.to_thread.run_sync(get, "/nope") == 404
    assert await trio.to_thread.run_sync(get, "/") == 200
    assert await trio.to_thread.run_sync(get, "/metrics") == 200


def test_bad_metrics_address_is_refused_clearly(sock_dir):
    for bad, says in [("9101", "give HOST:PORT"), ("127.0.0.1:x", "port 'x' is not a number"),
                      ("127.0.0.1:70000", "out of range")]:
        result = subprocess.run([*DAEMON, "--socket-path", os.path.join(sock_dir, "s"), "--metrics-address", bad],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and says in result.stderr, result.stderr
    assert parse_address("[::1]:9101") == ("::1", 9101)
    # a port somebody holds: a clear start-up error, exit 1, no socket files left
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        path = os.path.join(sock_dir, "t.sock")
        result = subprocess.run([*DAEMON, "--socket-path", path, "--metrics-address", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot listen for metrics on 127.0.0.1:{port}" in result.stdout + result.stderr
    assert not os.path.exists(path) and not os.path.exists(path + ".ctl")


def test_metrics_are_off_by_default():
    from vhostballoon.cli import _daemon_parser

    assert _daemon_parser().parse_args(["--socket-path", "/x"]).metrics_address is None
