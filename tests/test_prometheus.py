"""A real Prometheus (Debian's ``prometheus``) scrapes a running daemon and
the policy on loopback, and its HTTP API answers (issue 14, item 4): the
series exist, ``vhostballoon_actual_bytes`` equals query-balloon's
``actual``, and the policy's own series are there. Started here on a free
loopback port with a generated configuration, stopped after. .ci/run
installs the package; without it the test is skipped, saying so."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
import trio

from backend_support import MiB, SMALL_GUEST, wait_until
from vhostballoon.testing import model_guest

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (Debian: apt-get install prometheus)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]["result"]


def control(path: str, command: str, **arguments) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        s.sendall((json.dumps(request) + "\n").encode())
        return json.loads(s.makefile().readline())["return"]


async def test_prometheus_scrapes_the_daemon_and_the_policy(sock_dir, tmp_path):
    daemon_port, policy_port, prom_port = free_port(), free_port(), free_port()
    sock = os.path.join(sock_dir, "vb.sock")
    (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: vhostballoon
    static_configs: [{{targets: ["127.0.0.1:{daemon_port}"]}}]
  - job_name: vhostballoon-policy
    static_configs: [{{targets: ["127.0.0.1:{policy_port}"]}}]
""")
    logs = open(tmp_path / "processes.log", "wb")
    processes = []

    async def start(argv):
        process = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=logs, stderr=logs)
        processes.append(process)
        return process

    try:
        daemon = await start([sys.executable, "-m", "vhostballoon", "--socket-path", sock, "--state-dir", "none",
                              "--name", "vm-prom", "--metrics-address", f"127.0.0.1:{daemon_port}", "--stats-interval", "1"])
        await wait_until(lambda: daemon.returncode is not None or os.path.exists(sock + ".ctl"), timeout=20,
                         what="the daemon")
        assert daemon.returncode is None, (tmp_path / "processes.log").read_text()
        await start([sys.executable, "-m", "vhostballoon.policy.cli", "run", "--sockets", f"vm-prom={sock}.ctl",
                     "--dry-run", "--interval", "0.5", "--metrics-address", f"127.0.0.1:{policy_port}"])
        prometheus = await start([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                  f"--storage.tsdb.path={tmp_path / 'data'}",
                                  f"--web.listen-address=127.0.0.1:{prom_port}"])
        async with model_guest(sock, ram_size=SMALL_GUEST) as guest:
            control(sock + ".ctl", "balloon", value=176 * MiB)
            await wait_until(lambda: control(sock + ".ctl", "query-balloon")["actual"] == 176 * MiB, timeout=30,
                             what="the guest at 176 MiB")
            actual = 176 * MiB

            def scraped() -> bool:
                assert prometheus.returncode is None, (tmp_path / "processes.log").read_text()[-3000:]
                try:
                    result = api(prom_port, 'vhostballoon_actual_bytes{vm="vm-prom"}')
                except OSError:
                    return False  # not listening yet
                return bool(result) and float(result[0]["value"][1]) == actual

            await wait_until(lambda: scraped(), timeout=60, what="Prometheus to scrape actual")
            await wait_until(lambda: bool(api(prom_port, "vhostballoon_policy_cycles_total")), timeout=30,
                             what="the policy's series")
            up = {r["metric"]["job"]: r["value"][1] for r in await trio.to_thread.run_sync(api, prom_port, "up")}
            assert up == {"vhostballoon": "1", "vhostballoon-policy": "1"}
            for series in ("vhostballoon_target_bytes", "vhostballoon_ballooned_bytes", "vhostballoon_freed_measured_bytes",
                           "vhostballoon_inflate_buffers_total", "vhostballoon_thp_splits_total"):
                result = await trio.to_thread.run_sync(api, prom_port, f'{series}{{vm="vm-prom"}}')
                assert len(result) == 1, series
            target = await trio.to_thread.run_sync(api, prom_port, 'vhostballoon_target_bytes{vm="vm-prom"}')
            assert float(target[0]["value"][1]) == 176 * MiB
            # the policy saw the same guest size through the control socket
            await wait_until(lambda: [float(r["value"][1]) for r in api(
                prom_port, 'vhostballoon_policy_guest_actual_bytes{vm="vm-prom"}')] == [actual], timeout=30,
                what="the policy's view of the guest in Prometheus")
    finally:
        for process in reversed(processes):
            if process.returncode is None:
                process.terminate()
        with trio.move_on_after(15):
            for process in processes:
                await process.wait()
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        logs.close()
