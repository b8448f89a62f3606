"""``--metrics-address HOST:PORT``: the balloon's figures for Prometheus.

Each scrape reads the service's own figures (``BalloonService.query()`` and
``query_stats()``, the very numbers ``query-balloon`` returns) in the trio
thread, so a scrape sees exactly what the control socket would, and nothing
runs beside the event loop. The text is produced by ``prometheus_client``
(``generate_latest`` over a collector); the HTTP around it is the least a
scraper needs: ``GET /metrics``, one reply, close.

Every metric carries the label ``vm`` (``--name``; default: the socket path).
Names and meanings are listed in the README (Metrics).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog
import trio
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger("vhostballoon.metrics")

PREFIX = "vhostballoon_"
MAX_REQUEST = 8192
# generate_latest writes the classic text format, 0.0.4, which every Prometheus
# parses (newer prometheus_client announce 1.0.0 that older servers do not know).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_TIMEOUT = 5.0

# query-balloon key -> (metric name without prefix, help); gauges in bytes
BYTE_GAUGES = [
    ("actual", "actual_bytes", "guest memory size as QMP's 'actual': RAM minus the balloon, as the guest last wrote it"),
    ("target", "target_bytes", "the operator's target guest memory size"),
    ("guest-ram-bytes", "guest_ram_bytes", "the guest's RAM size"),
    ("ballooned-bytes", "ballooned_bytes", "guest memory in the balloon now"),
    ("freed-bytes-measured", "freed_measured_bytes",
     "host memory freed behind ballooned and reported pages, measured from the memfd's allocated blocks"),
    ("report-freed-bytes-measured", "report_freed_measured_bytes",
     "host memory freed behind reported pages alone, measured"),
    ("host-allocated-bytes", "host_allocated_bytes", "host memory allocated behind guest RAM now"),
    ("pending-bytes", "pending_bytes", "ballooned bytes held back as parts of huge pages not wholly ballooned yet"),
]
# query-balloon key -> (name without _total, help); counters of the current front-end session
COUNTERS = [
    ("inflate-buffers", "inflate_buffers", "inflate buffers served"),
    ("deflate-buffers", "deflate_buffers", "deflate buffers served"),
    ("range-inflate-buffers", "range_inflate_buffers", "range-inflate buffers served"),
    ("range-deflate-buffers", "range_deflate_buffers", "range-deflate buffers served"),
    ("invalid-pfns", "invalid_pfns", "PFNs refused: outside guest memory or otherwise invalid"),
    ("repeated-pfns", "repeated_pfns", "PFNs inflated while already in the balloon"),
    ("ranges-refused", "ranges_refused", "ranges refused by the range queues"),
    ("report-invalid-entries", "report_invalid_entries", "free page reporting entries refused"),
    ("reported-bytes", "reported_bytes", "bytes the guest reported free"),
    ("discarded-bytes", "discarded_bytes", "bytes freed by discard calls"),
    ("discard-syscalls", "discard_syscalls", "discard system calls made"),
    ("thp-splits", "thp_splits", "transparent huge pages split by a partial discard"),
    ("huge-pages-freed-whole", "huge_pages_freed_whole", "huge pages freed whole, with no split"),
    ("pages-deflated-unasked", "pages_deflated_unasked", "pages the guest took back by itself (deflate on OOM)"),
]
# guest statistics (query-stats names) that are amounts in bytes
STAT_BYTES = {"stat-free-memory", "stat-total-memory", "stat-available-memory", "stat-disk-caches"}
# cumulative guest counters, in bytes
STAT_BYTE_COUNTERS = {"stat-swap-in", "stat-swap-out", "stat-async-scans", "stat-direct-scans",
                      "stat-async-reclaims", "stat-direct-reclaims"}


def _metric_stat_name(stat: str) -> str:
    return "guest_" + stat.removeprefix("stat-").replace("-", "_")


class BalloonCollector(Collector):
    """The figures of one back-end, read at each scrape."""

    def __init__(self, query: Callable[[], dict[str, Any]], query_stats: Callable[[], dict[str, Any]], name: str) -> None:
        self.query = query
        self.query_stats = query_stats
        self.name = name

    def _gauge(self, name: str, doc: str, value: float, unit_labels: dict[str, str] | None = None) -> GaugeMetricFamily:
        labels = {"vm": self.name, **(unit_labels or {})}
        family = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(PREFIX + name, doc, labels=["vm"])
        family.add_metric([self.name], value)
        return family

    def _service_histogram(self, service: dict[str, Any]) -> HistogramMetricFamily:
        """The C queue threads' per-buffer service times (pop to used ring)."""
        family = HistogramMetricFamily(
            PREFIX + "buffer_service_seconds",
            "time from taking a guest's inflate/deflate buffer off the ring to returning it (the device's share "
            "of the buffer's round trip), this front-end session",
            labels=["vm"],
        )
        cumulative, buckets = 0, []
        for bound_us, count in zip(service["le-us"], service["counts"]):
            cumulative += count
            buckets.append((repr(bound_us / 1e6), cumulative))
        buckets.append(("+Inf", cumulative + service["counts"][-1]))
        family.add_metric([self.name], buckets, sum_value=service["sum-us"] / 1e6)
        return family

    def collect(self) -> Iterator:
        info = self.query()
        yield self._gauge("connected", "1 while a front-end (QEMU) is connected", 1 if info.get("connected") else 0)
        yield self._counter("sessions_served", "front-end connections served since start", info.get("sessions-served", 0))
        for key, name, doc in BYTE_GAUGES:
            value = info.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                yield self._gauge(name, doc, value)
        if info.get("connected"):
            for key, name, doc in COUNTERS:
                value = info.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    yield self._counter(name, doc + " (this front-end session; restarts at 0 with the next)", value)
            pages = GaugeMetricFamily(PREFIX + "ballooned_pages", "4 KiB pages in the balloon, by the queue kind that brought them",
                                      labels=["vm", "via"])
            pages.add_metric([self.name, "pfn"], info.get("pages-ballooned-by-pfn", 0))
            pages.add_metric([self.name, "range"], info.get("pages-ballooned-by-range", 0))
            yield pages
            service = info.get("buffer-service-time")
            if service:
                yield self._service_histogram(service)
        stats = self.query_stats()
        if stats.get("age-seconds") is not None:
            yield self._gauge("guest_stats_age_seconds", "age of the guest's latest statistics", stats["age-seconds"])
        yield self._counter("guest_stats_updates", "statistics buffers received from the guest", stats.get("updates", 0))
        for stat, value in (stats.get("stats") or {}).items():
            name = _metric_stat_name(stat)
            doc = f"the guest's latest '{stat}' statistic"
            if stat in STAT_BYTES:
                yield self._gauge(name + "_bytes", doc, value)
            elif stat in STAT_BYTE_COUNTERS:
                yield self._counter(name + "_bytes", doc + " (cumulative in the guest)", value)
            else:
                yield self._counter(name, doc + " (cumulative in the guest)", value)


def registry_for(query: Callable[[], dict[str, Any]], query_stats: Callable[[], dict[str, Any]], name: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BalloonCollector(query, query_stats, name))
    return registry


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT); clear errors for anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"metrics address {text!r}: give HOST:PORT, e.g. 127.0.0.1:9101")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"metrics address {text!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"metrics address {text!r}: port {number} out of range 0-65535")
    return host, number


async def open_metrics_listener(address: str) -> trio.SocketListener:
    host, port = parse_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for metrics on {address}: {exc.strerror}") from None
    return listeners[0]


def _reply(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


async def _handle(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    request = bytearray()
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
            data = await stream.receive_some(4096)
            if not data:
                break
            request += data
    line = bytes(request).split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        reply = _reply("400 Bad Request", b"expected an HTTP request line\n")
    elif parts[0] not in ("GET", "HEAD"):
        reply = _reply("405 Method Not Allowed", b"only GET\n")
    elif parts[1].split("?", 1)[0] == "/metrics":
        started = time.perf_counter()
        body = generate_latest(registry)
        log.debug("scraped", seconds=round(time.perf_counter() - started, 6))
        reply = _reply("200 OK", b"" if parts[0] == "HEAD" else body, CONTENT_TYPE)
    elif parts[1] == "/":
        reply = _reply("200 OK", b"vhostballoon: metrics at /metrics\n")
    else:
        reply = _reply("404 Not Found", b"not found: try /metrics\n")
    with trio.move_on_after(REQUEST_TIMEOUT):
        await stream.send_all(reply)


async def serve_metrics(listener: trio.SocketListener, registry: CollectorRegistry) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _handle(stream, registry)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("metrics client gone", reason=type(exc).__name__)
        except Exception:  # a scrape must never stop the daemon
            log.exception("metrics request failed")
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, [listener])
