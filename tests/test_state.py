"""The operator's target survives a back-end restart through the state directory."""

import json

from vhostballoon.server.service import BalloonService
from vhostballoon.server.state import StateStore


def test_target_saved_and_restored(tmp_path):
    store = StateStore(tmp_path / "vb.state")
    BalloonService(state=store).set_target(512 << 20)
    assert json.loads((tmp_path / "vb.state" / "state.json").read_text())["target"] == 512 << 20
    assert BalloonService(state=StateStore(tmp_path / "vb.state")).target_bytes == 512 << 20
    # no temporary file left behind by the atomic replace
    assert sorted(p.name for p in (tmp_path / "vb.state").iterdir()) == ["state.json"]


def test_missing_state_means_no_target(tmp_path):
    assert BalloonService(state=StateStore(tmp_path / "nothing")).target_bytes is None


def test_damaged_state_is_set_aside_not_fatal(tmp_path):
    d = tmp_path / "vb.state"
    d.mkdir()
    (d / "state.json").write_text('{"version": 1, "target": 5')  # torn
    assert BalloonService(state=StateStore(d)).target_bytes is None
    assert (d / "state.damaged").read_text().startswith('{"version": 1')
    assert not (d / "state.json").exists()


def test_rejected_target_is_not_saved(tmp_path):
    store = StateStore(tmp_path / "s")
    service = BalloonService(state=store)
    service.set_target(1 << 30)
    try:
        service.set_target(0)
    except Exception:
        pass
    assert store.load()["target"] == 1 << 30
