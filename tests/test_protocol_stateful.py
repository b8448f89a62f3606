"""BackendConnection under any sequence of valid and invalid input (hypothesis
stateful testing, no sockets).

The machine feeds well-formed requests of every kind (with bodies and fd
counts that fit, or not), raw headers with random sizes, and garbage, in one
chunk, split in two or byte by byte; it asks for events, completes them with
the right payload or (counted as our misuse) a wrong one, and reads the
replies.  Throughout:

- only the documented errors come out: ProtocolError for the peer's faults,
  LocalProtocolError only when this test misused the API;
- after the first error the connection is poisoned: every later
  receive_data / next_event / complete raises the same family, and the fds
  fed to it then are closed at once;
- every fd handed in is either returned, the very same file (its eventfd
  counter or memfd name identifies it), inside exactly one event, or closed
  by the connection: the process's fd count says so after every step, and
  after close() nothing is left;
- everything in data_to_send() decodes as replies a front-end accepts.
"""

from __future__ import annotations

import itertools
import os
import struct

import hypothesis.strategies as st
from hypothesis import HealthCheck, event as hypothesis_event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vhostballoon.device.features import DEFAULT_FEATURES
from vhostballoon.testing.fds import fd_count
from vhostballoon.vhost_user import connection as vu
from vhostballoon.vhost_user.codec import (
    REQUEST_SPECS,
    ConfigSpace,
    Empty,
    FdRule,
    MemoryRegion,
    MemoryTable,
    MessageDecoder,
    Raw,
    SingleMemoryRegion,
    U64,
    VringAddr,
    VringFd,
    VringState,
)
from vhostballoon.vhost_user.constants import MAX_FDS, NEED_REPLY, VERSION, Request
from vhostballoon.vhost_user.errors import LocalProtocolError, ProtocolError

NUM_QUEUES = 5
CONFIG_SIZE = 16
U64_MAX = (1 << 64) - 1
_ids = itertools.count(1)
SERVED = [r for r in Request if vu.RULES[r].handling is not vu.Handling.UNSUPPORTED]


def identity(fd: int) -> str | None:
    """What an fd is, by its content: an eventfd's counter or a memfd's name;
    None if it is not open."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    if target.startswith("/memfd:"):
        return target.split()[0]
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("eventfd-count:"):
                    return f"eventfd:{int(line.split()[1], 16)}"
    except OSError:
        return None
    return target


def new_fd(kind: str) -> tuple[int, str]:
    """A real fd that can be told apart from every other one."""
    n = next(_ids)
    if kind == "memfd":
        fd = os.memfd_create(f"vbst-{n}", os.MFD_CLOEXEC)
    else:
        fd = os.eventfd(n, os.EFD_CLOEXEC)
    return fd, identity(fd)


# -- what a front-end may send ------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, U64_MAX)
queue_index = st.one_of(st.integers(0, NUM_QUEUES + 2), u32)
small_addr = st.one_of(st.integers(0, 1 << 34), u64)


def region():
    return st.builds(MemoryRegion, gpa=small_addr, size=st.one_of(st.integers(0, 1 << 30), u64),
                     uaddr=small_addr, mmap_offset=small_addr)


def payload_for(request: Request):
    """Bodies of the right type for ``request`` (right size, any values)."""
    kind = REQUEST_SPECS[request].payload
    if kind is Empty:
        return st.just(Empty())
    if kind is U64:
        if request is Request.SET_PROTOCOL_FEATURES:
            return st.builds(U64, st.one_of(st.integers(0, int(vu.SUPPORTED_PROTOCOL_FEATURES)), u64))
        if request is Request.SET_FEATURES:
            offered = DEFAULT_FEATURES | (1 << 30)
            return st.builds(U64, st.one_of(st.integers(0, U64_MAX).map(lambda v: v & offered), u64))
        return st.builds(U64, st.one_of(st.integers(0, 0x1FF), u64))
    if kind is VringState:
        return st.builds(VringState, index=queue_index, num=st.one_of(st.sampled_from([0, 1, 64, 128, 32768, 65536]), u32))
    if kind is VringAddr:
        return st.builds(VringAddr, index=queue_index, flags=st.one_of(st.just(0), u32), desc=small_addr,
                         used=small_addr, avail=small_addr, log=small_addr)
    if kind is VringFd:
        return st.builds(VringFd, index=st.integers(0, 0xFF), invalid=st.booleans())
    if kind is MemoryTable:
        return st.lists(region(), min_size=1, max_size=8).map(lambda rs: MemoryTable(regions=rs))
    if kind is SingleMemoryRegion:
        return st.builds(SingleMemoryRegion, region=region())
    if kind is ConfigSpace:
        return st.integers(0, 40).flatmap(
            lambda size: st.builds(ConfigSpace, offset=st.one_of(st.integers(0, 24), u32), size=st.just(size),
                                   flags=st.sampled_from([0, 1, 2, 0xFFFFFFFF]), data=st.binary(min_size=size, max_size=size)))
    return st.builds(Raw, st.binary(max_size=64))


def fds_for(request: Request, payload, optional: int) -> int:
    """How many fds the wire table accepts with this message (``optional``,
    0 or 1, where an fd may come or not)."""
    rule = REQUEST_SPECS[request].fds
    if rule is FdRule.ONE:
        return 1
    if rule is FdRule.OPTIONAL:
        return optional
    if rule is FdRule.PER_REGION:
        return len(payload.regions)
    if rule is FdRule.VRING_FILE:
        return 0 if payload.invalid else 1
    return 0


@st.composite
def messages(draw):
    """(bytes, number of fds, fd kind) of one message: mostly well-formed,
    sometimes with a wrong fd count, flags, body size or field values, now
    and then plain garbage."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(min_size=1, max_size=200)), draw(st.integers(0, MAX_FDS + 1)), "eventfd"
    # Mostly requests this back-end serves (the others only poison the connection).
    request = draw(st.sampled_from(SERVED if draw(st.integers(0, 9)) else list(Request)))
    payload = draw(payload_for(request))
    body = payload.to_bytes()
    flags = VERSION | (NEED_REPLY if draw(st.booleans()) else 0)
    nfds = fds_for(request, payload, draw(st.integers(0, 1)))
    spoil = draw(st.sampled_from(["none"] * 14 + ["fds", "flags", "size", "body", "values", "values"]))
    if spoil == "fds":
        nfds = draw(st.integers(0, MAX_FDS + 1))
    elif spoil == "flags":
        flags = draw(u32)
    elif spoil == "body":  # any length
        body = draw(st.binary(max_size=80))
    elif spoil == "values":  # the right length, any bytes: every field's own checks
        body = draw(st.binary(min_size=len(body), max_size=len(body)))
    header_size = len(body) if spoil != "size" else draw(st.one_of(st.integers(0, 300), u32))
    data = struct.pack("=III", int(request), flags, header_size) + body
    kind = "memfd" if request in (Request.SET_MEM_TABLE, Request.ADD_MEM_REG) else draw(st.sampled_from(["eventfd", "memfd"]))
    return data, nfds, kind


class ConnectionMachine(RuleBasedStateMachine):
    """One BackendConnection, fed by a front-end that may do anything."""

    @initialize(negotiated=st.booleans())
    def start(self, negotiated: bool = False) -> None:
        self.baseline = fd_count()
        self.conn = vu.BackendConnection(
            device_features=DEFAULT_FEATURES,
            protocol_features=int(vu.SUPPORTED_PROTOCOL_FEATURES),
            num_queues=NUM_QUEUES,
            config_size=CONFIG_SIZE,
        )
        self.outstanding: dict[int, str] = {}  # fd handed in -> its identity (the connection owns it)
        self.error: type | None = None  # family of the first error, once poisoned
        self.pending: vu.Event | None = None
        self.replies = MessageDecoder.for_replies()
        self.events = 0
        if negotiated:  # half the runs start past QEMU's handshake: feature-gated requests get further
            self.handshake()

    # -- bookkeeping ---------------------------------------------------------------------------

    def hand_in(self, count: int, kind: str) -> list[int]:
        fds = []
        for _ in range(count):
            fd, ident = new_fd(kind)
            self.outstanding.pop(fd, None)  # that number was closed by the connection: it may
            self.outstanding[fd] = ident    # close what it owns, and the kernel reuses numbers
            fds.append(fd)
        return fds

    def take_event_fds(self, event: vu.Event) -> None:
        for fd in event.fds:
            assert fd in self.outstanding, f"{type(event).__name__} returned fd {fd}, never handed in or returned twice"
            assert identity(fd) == self.outstanding.pop(fd), f"fd {fd} of {type(event).__name__} is another file now"
            os.close(fd)  # ours now

    def expect_error(self, call, *, misuse: bool = False):
        """Run call(); an exception must be the documented one, and poisons."""
        try:
            result = call()
        except (ProtocolError, LocalProtocolError) as exc:
            family = type(exc)
            hypothesis_event(f"{family.__name__}: {str(exc).split(':')[0][:40]}")
            if self.error is not None:
                assert family is self.error, f"poisoned by {self.error.__name__}, then raised {family.__name__}: {exc}"
            else:
                # The peer's fault is a ProtocolError; ours (and only ours) a LocalProtocolError.
                assert family is (LocalProtocolError if misuse else ProtocolError), f"{family.__name__}: {exc}"
                self.error = family
            self.pending = None
            return None
        assert self.error is None, f"a poisoned connection ({self.error.__name__}) accepted a call"
        assert not misuse, "the connection accepted a misuse of its API"
        return result

    def deliver(self, data: bytes, fds: list[int], split: str, cut: int) -> None:
        if split == "whole" or len(data) < 2:
            chunks = [(data, fds)]
        elif split == "two":
            cut = 1 + cut % (len(data) - 1)
            chunks = [(data[:cut], fds), (data[cut:], [])]
        else:
            chunks = [(data[:1], fds)] + [(data[i : i + 1], []) for i in range(1, min(len(data), 64))]
            if len(data) > 64:
                chunks.append((data[64:], []))
        for chunk, chunk_fds in chunks:
            poisoned = self.error is not None
            self.expect_error(lambda: self.conn.receive_data(chunk, chunk_fds))
            if poisoned:
                for fd in chunk_fds:  # fed to a poisoned connection: closed at once
                    assert identity(fd) != self.outstanding.get(fd), f"fd {fd} fed after the error is still open"
            if self.error is not None:
                return

    # -- what a front-end (or this test) does --------------------------------------------------------

    @rule(message=messages(), split=st.sampled_from(["whole", "whole", "two", "bytes"]), cut=st.integers(0, 1 << 16))
    def send(self, message, split, cut) -> None:
        data, nfds, kind = message
        self.deliver(data, self.hand_in(nfds, kind), split, cut)

    @precondition(lambda self: self.error is not None)
    @rule()
    def next_connection(self) -> None:
        """The session closes a poisoned connection; a new front-end comes."""
        self.teardown()
        self.start(negotiated=True)

    @rule()
    def serve(self) -> None:
        """What the session does: every event, completed as asked, until NEED_DATA."""
        while self.error is None:
            if self.pending is not None:
                self.complete_correctly(self.pending)
            event = self.expect_error(self.conn.next_event)
            if event is None or event is vu.NEED_DATA:
                return
            hypothesis_event(f"event {type(event).__name__}")
            self.take_event_fds(event)
            self.pending = event

    def complete_correctly(self, event: vu.Event) -> None:
        if isinstance(event, vu.VringBaseGet):
            payload = 0
        elif isinstance(event, vu.ConfigGet):
            payload = bytes(event.size)
        else:
            payload = None
        self.expect_error(lambda: self.conn.complete(event, payload))
        self.pending = None

    @rule()
    def handshake(self) -> None:
        """What QEMU sends first, so that feature-gated requests get further."""
        offered = DEFAULT_FEATURES | (1 << 30)
        data = b"".join(
            struct.pack("=III", int(r), VERSION, len(p.to_bytes())) + p.to_bytes()
            for r, p in ((Request.SET_PROTOCOL_FEATURES, U64(int(vu.SUPPORTED_PROTOCOL_FEATURES))),
                         (Request.SET_OWNER, Empty()), (Request.SET_FEATURES, U64(offered)))
        )
        self.deliver(data, [], "whole", 0)

    @rule(misuse=st.integers(0, 19))
    def next_event(self, misuse) -> None:
        if self.pending is not None and misuse:  # only one in 20 times may the test misuse the API
            return
        misused = self.pending is not None
        event = self.expect_error(self.conn.next_event, misuse=misused)
        if event is None or event is vu.NEED_DATA:
            return
        assert isinstance(event, vu.Event), event
        hypothesis_event(f"event {type(event).__name__}")
        self.events += 1
        self.take_event_fds(event)
        self.pending = event

    @precondition(lambda self: self.pending is not None)
    @rule(ok=st.booleans(), wrong=st.integers(0, 9))
    def complete(self, ok, wrong) -> None:
        event = self.pending
        if isinstance(event, vu.VringBaseGet):
            payload = 7 if wrong else "seven"
        elif isinstance(event, vu.ConfigGet):
            payload = bytes(event.size) if wrong else bytes(event.size + 1)
        else:
            payload = None if wrong else b"unexpected"
        misuse = not wrong and ok  # a wrong payload is refused even with ok=True
        if isinstance(event, vu.ConfigGet) and not ok:
            misuse = False  # ok=False ignores the payload
        if not wrong and not ok and not isinstance(event, (vu.ConfigGet, vu.VringBaseGet)):
            misuse = True  # payload given to a request that takes none
        self.expect_error(lambda: self.conn.complete(event, payload, ok=ok), misuse=misuse)
        if isinstance(event, vu.VringBaseGet) and not ok and self.error is None:
            self.error = LocalProtocolError  # its reply cannot carry a failure: the connection ends
        self.pending = None

    @rule()
    def read_replies(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.replies.feed(out)
            while self.replies.next_message() is not None:
                pass

    # -- what must hold after every step ---------------------------------------------------------

    @invariant()
    def fds_are_accounted_for(self) -> None:
        if not hasattr(self, "conn"):
            return
        held = fd_count() - self.baseline
        assert held <= len(self.outstanding), f"{held} fds open beyond the start, {len(self.outstanding)} handed in"
        if self.error is not None:
            assert held == 0, f"poisoned ({self.error.__name__}) but {held} fds still open"
            self.outstanding.clear()

    @invariant()
    def poisoned_means_poisoned(self) -> None:
        if getattr(self, "error", None) is None:
            return
        for call in (self.conn.next_event, lambda: self.conn.receive_data(b"\0" * 12)):
            try:
                call()
            except self.error:
                continue
            raise AssertionError(f"a connection poisoned by {self.error.__name__} did not raise it again")

    def teardown(self) -> None:
        if not hasattr(self, "conn"):
            return
        self.conn.close()
        self.conn.close()  # idempotent
        assert fd_count() == self.baseline, f"{fd_count() - self.baseline} fds left after close()"
        tail = self.conn.data_to_send()  # still answers with what was earned, even now
        if tail:
            self.replies.feed(tail)
            while self.replies.next_message() is not None:
                pass


ConnectionMachine.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestConnectionMachine = ConnectionMachine.TestCase
