"""Control commands as pure functions: request line in, reply object out."""

import json

import pytest

from vhostballoon.server.control import execute_line
from vhostballoon.server.service import BalloonService


@pytest.fixture
def service():
    return BalloonService()


def run(service, obj) -> dict:
    line = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return execute_line(service, line)


def test_balloon_sets_target_without_a_frontend(service):
    assert run(service, {"execute": "balloon", "arguments": {"value": 512 << 20}}) == {"return": {}}
    assert service.target_bytes == 512 << 20
    info = run(service, {"execute": "query-balloon", "id": 3})
    assert info["id"] == 3
    assert info["return"]["target"] == 512 << 20
    assert info["return"]["connected"] is False
    assert info["return"]["actual"] is None


@pytest.mark.parametrize("value", [0, -1, "512M", 1.5, True, None])
def test_balloon_rejects_bad_values_and_keeps_target(service, value):
    service.target_bytes = 1 << 30
    reply = run(service, {"execute": "balloon", "arguments": {"value": value}})
    assert reply["error"]["class"] == "GenericError"
    assert repr(value) in reply["error"]["desc"]
    assert service.target_bytes == 1 << 30


@pytest.mark.parametrize(
    "line, fragment",
    [
        (b"{not json", "not a JSON object"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"arguments": {}}', "missing 'execute'"),
        (b'{"execute": "quit"}', "unknown command 'quit'"),
        (b'{"execute": "balloon", "arguments": []}', "'arguments' must be a JSON object"),
        (b'{"execute": "balloon", "arguments": {"value": 1, "x": 2}}', "exactly one argument"),
        (b"\xff\xfe", "not a JSON object"),
    ],
)
def test_garbage_gets_a_named_error(service, line, fragment):
    reply = execute_line(service, line)
    assert fragment in reply["error"]["desc"]


def test_unknown_command_class_is_command_not_found(service):
    assert run(service, {"execute": "nope"})["error"]["class"] == "CommandNotFound"
