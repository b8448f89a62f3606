"""What outlives a front-end connection: the operator's target, the event
subscribers of the control socket, and which session is current."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..device.features import DEFAULT_FEATURES, feature_flag_names, feature_names
from ..device.queues import queue_roles
from ..device.hugepages import FlushPolicy, HugePolicy, describe_discards
from ..device.stats import DEFAULT_STATS_INTERVAL, GuestStats
from .state import StateStore

if TYPE_CHECKING:
    from .session import FrontendSession

log = structlog.get_logger("vhostballoon.service")

# Events queued for a control client that does not read; past this it is dropped.
EVENT_BACKLOG = 256


class CommandError(Exception):
    """A control command that cannot be carried out; ``qmp_class`` as QMP names it."""

    def __init__(self, desc: str, qmp_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.qmp_class = qmp_class


class BalloonService:
    def __init__(
        self,
        *,
        features: int = DEFAULT_FEATURES,
        target_bytes: int | None = None,
        state: StateStore | None = None,
        flush_policy: FlushPolicy | None = None,
        stats_interval: float = DEFAULT_STATS_INTERVAL,
        fast_config: bool = True,
    ) -> None:
        self.features = features
        # Sessions answer the guest's per-buffer GET_CONFIG/SET_CONFIG in
        # their C reader thread (False: every message through Python, for
        # tests that compare the two).
        self.fast_config = fast_config
        self.stats_interval = self._check_interval(stats_interval)
        self.state = state
        saved = state.load() if state is not None else {}
        if target_bytes is None:
            target_bytes = saved.get("target")
            if target_bytes is not None:
                log.info("target restored from the state directory", target=target_bytes, path=str(state.path))
        self.target_bytes = target_bytes
        self.flush_policy = flush_policy or FlushPolicy()
        self.session: FrontendSession | None = None
        self.sessions_served = 0
        self._subscribers: set[trio.MemorySendChannel] = set()
        self.last_session_figures: dict[str, Any] | None = None

    # -- the operator's intent -------------------------------------------------

    def set_target(self, target_bytes: int) -> None:
        if not isinstance(target_bytes, int) or isinstance(target_bytes, bool) or target_bytes <= 0:
            raise CommandError(f"Parameter 'value' expects a size in bytes greater than 0, got {target_bytes!r}")
        session = self.session
        ram = session.device.ram_bytes if session else 0
        if ram and target_bytes > ram:
            log.info("target above guest RAM: clamped", target=target_bytes, guest_ram=ram)
        self.target_bytes = target_bytes
        self._save()
        log.info("target set", target=target_bytes, connected=session is not None)
        if session is not None:
            session.set_target(target_bytes)

    def set_huge_policy(self, mode: str, flush_bytes: int | None = None, flush_after: float | None = None) -> FlushPolicy:
        """Change how partly ballooned huge pages are handled, at run time."""
        current = self.flush_policy
        try:
            policy = FlushPolicy(
                HugePolicy(mode),
                current.flush_bytes if flush_bytes is None else flush_bytes,
                current.flush_after if flush_after is None else flush_after,
            )
        except ValueError as exc:
            known = ", ".join(p.value for p in HugePolicy)
            raise CommandError(f"bad huge page policy {mode!r} / flush-bytes {flush_bytes!r} / flush-after {flush_after!r}: {exc} (policies: {known})") from None
        self.flush_policy = policy
        log.info("huge page policy set", policy=policy.mode.value, flush_bytes=policy.flush_bytes, flush_after=policy.flush_after)
        if self.session is not None:
            self.session.set_flush_policy(policy)
        return policy

    @staticmethod
    def _check_interval(seconds: Any) -> float:
        if (
            not isinstance(seconds, (int, float))
            or isinstance(seconds, bool)
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise CommandError(f"stats interval must be a number of seconds >= 0 (0: off), got {seconds!r}")
        return float(seconds)

    def set_stats_interval(self, seconds: float) -> float:
        """How often the guest is asked for fresh statistics (0: never), at run time."""
        self.stats_interval = self._check_interval(seconds)
        log.info("stats interval set", stats_interval=self.stats_interval)
        if self.session is not None:
            self.session.stats_interval_changed()
        return self.stats_interval

    def query_stats(self) -> dict[str, Any]:
        """The guest's latest statistics (query-stats)."""
        session = self.session
        stats = session.device.stats if session is not None else GuestStats()
        result = stats.describe(self.stats_interval)
        result["connected"] = session is not None
        result["negotiated"] = bool(session is not None and "balloon:stats_vq" in feature_names(session.device.acked_features))
        return result

    def _save(self) -> None:
        if self.state is None:
            return
        try:
            self.state.save(target=self.target_bytes)
        except OSError as exc:
            log.error("could not save the target: it will not survive a restart", error=str(exc))

    # -- figures -----------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        session = self.session
        result: dict[str, Any] = {
            "actual": None,
            "target": self.target_bytes,
            "connected": session is not None,
            "offered-features": feature_names(self.features),
            "offered-feature-flags": feature_flag_names(self.features),
            "offered-queues": [r.value for r in queue_roles(self.features)],
            "stats-interval": self.stats_interval,
            "sessions-served": self.sessions_served,
            "huge-page-policy": self.flush_policy.mode.value,
            "flush-bytes": self.flush_policy.flush_bytes,
            "flush-after": self.flush_policy.flush_after,
        }
        if session is not None:
            device = session.device
            session.absorb_queue_work()
            result["actual"] = device.actual_bytes
            result.update(device.describe())
            result.update(session.huge.describe())
            result.update(describe_discards(device.counters.discard))
            result["host-allocated-bytes"] = session.memory.allocated_bytes()
            result["broken-queues"] = session.broken_queues()
            result.update(session.describe_front())
            result["guest-stats"] = device.stats.describe(self.stats_interval)
        return result

    # -- events ------------------------------------------------------------------

    def subscribe(self) -> tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel]:
        """A channel of events; pass its send side to unsubscribe()."""
        send, receive = trio.open_memory_channel(EVENT_BACKLOG)
        self._subscribers.add(send)
        return send, receive

    def unsubscribe(self, send: trio.MemorySendChannel) -> None:
        self._subscribers.discard(send)
        send.close()

    def publish(self, name: str, data: dict[str, Any]) -> None:
        now = time.time()
        event = {
            "event": name,
            "data": data,
            "timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)},
        }
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                log.warning("control client does not read its events: dropping it", backlog=EVENT_BACKLOG)
                self._subscribers.discard(send)
                send.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(send)
