import pytest

from tests.conftest import skip_unless_required
from wbc_tasks.core.settings import COMPLETE_MARKER
from wbc_tasks.core.workdir import read_marker, require_complete, run_step


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


# ------------------------------------------------------------------ disk full (a real tmpfs)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted in the test's folder (unmounted afterwards); skips where mounting
    is not permitted (not root, or no CAP_SYS_ADMIN in a container)."""
    import os
    import subprocess

    folder = tmp_path / "small-disk"
    folder.mkdir()
    if os.geteuid() != 0:
        skip_unless_required("disk-full test needs root to mount a small tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        skip_unless_required(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_disk_full_fails_clearly_without_marker_and_the_rerun_starts_afresh(
    small_disk, settings, tmp_path, monkeypatch
):
    """The preprocess task on a work volume with too little space left: a clear error naming the
    folder, no marker; with space freed, the retried task wipes the leftovers and completes."""
    import errno

    from tests.conftest import write_image
    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.core.workdir import NoSpaceError
    from wbc_tasks.data.dataset import split_dataset
    from wbc_tasks.data.store import open_store
    from wbc_tasks.pipelines import training as steps

    data = tmp_path / "WBC"
    for i in range(16):  # 16 images x 256 x 256 x 3 bytes = 3 MiB of stores
        write_image(data / ("blasts" if i % 2 else "neutrophils") / f"cell{i}.png", seed=i)
    monkeypatch.setenv("WBC_WORK_DIR", str(small_disk))
    settings = get_settings()
    run = settings.run_dir("manual__disk")
    run_step(run / "split", lambda out: split_dataset(data, out, settings))
    ballast = small_disk / "other-runs.bin"  # another run's files: 1 MiB left for this one
    ballast.write_bytes(b"\0" * (3 * 2**20))
    params = {"image_size": 256, "data_dir": str(data)}

    with pytest.raises(NoSpaceError) as failed:
        steps.preprocess_step("manual__disk", params)
    message = str(failed.value)
    assert failed.value.errno == errno.ENOSPC
    assert "no space left on device" in message and str(run / "preprocess") in message
    assert "MiB free" in message, message
    assert (run / "preprocess").is_dir() and read_marker(run / "preprocess") is None
    with pytest.raises(RuntimeError, match="did not finish"):
        require_complete(run / "preprocess")

    ballast.unlink()  # space freed; Airflow retries the task
    (run / "preprocess" / "stale.bin").write_bytes(b"left over")  # whatever the attempt left
    summary = steps.preprocess_step("manual__disk", params)
    assert read_marker(run / "preprocess") == summary
    assert not (run / "preprocess" / "stale.bin").exists(), "leftovers were not wiped"
    stored = sum(len(open_store(run / "preprocess" / split)) for split in ("train", "val", "test"))
    assert stored == 16 and open_store(run / "preprocess" / "train").image_size == 256
