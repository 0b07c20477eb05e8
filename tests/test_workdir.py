import pytest

from wbc_tasks.config import COMPLETE_MARKER
from wbc_tasks.workdir import read_marker, require_complete, run_step


def test_marker_written_last_and_reused_on_retry(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "out.txt").write_text("data")
        assert not (folder / COMPLETE_MARKER).exists(), "marker must come after the output"
        return {"n": 1}

    first = run_step(tmp_path / "step", build)
    second = run_step(tmp_path / "step", build)
    assert first == second and first["n"] == 1
    assert len(calls) == 1, "a completed step is not recomputed"


def test_interrupted_attempt_is_cleared_before_retry(tmp_path):
    def crash(folder):
        (folder / "half.bin").write_bytes(b"partial")
        raise RuntimeError("worker killed")

    with pytest.raises(RuntimeError):
        run_step(tmp_path / "step", crash)
    assert read_marker(tmp_path / "step") is None
    with pytest.raises(RuntimeError, match="did not finish"):
        require_complete(tmp_path / "step")

    def build(folder):
        assert not (folder / "half.bin").exists(), "leftovers of the failed attempt were not removed"
        return {"ok": True}

    assert run_step(tmp_path / "step", build)["ok"] is True
