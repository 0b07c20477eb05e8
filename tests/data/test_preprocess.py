import shutil

import numpy as np
import pandas as pd

from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.core.workdir import run_step
from wbc_tasks.data.dataset import read_manifest, split_dataset
from wbc_tasks.data.preprocess import preprocess_splits
from wbc_tasks.data.store import open_store


def test_stores_hold_every_manifest_image_as_uint8(seed_shaped, settings):
    run = settings.run_dir("p")
    run_step(run / "split", lambda d: split_dataset(seed_shaped, d, settings))
    summary = run_step(run / "preprocess", lambda d: preprocess_splits(run / "split", d, settings, 48))
    manifest = read_manifest(run / "split")
    total = 0
    for split in ("train", "val", "test"):
        store = open_store(run / "preprocess" / split)
        expected = manifest[manifest["split"] == split]
        assert len(store) == len(expected)
        assert store.images.dtype == np.uint8 and store.images.shape[1:] == (48, 48, 3)
        assert isinstance(store.images, np.memmap), "stores are memory-mapped, not loaded"
        assert sorted(store.records["sha256"]) == sorted(expected["sha256"])
        # Labels agree with the class column.
        assert [CLASS_NAMES[i] for i in store.labels] == list(store.records["class"])
        total += len(store)
        assert summary["counts"][split] == expected["class"].value_counts().to_dict()
    assert total == 528


def test_file_broken_after_validation_is_rejected_not_fatal(seed_shaped, settings, tmp_path):
    data = tmp_path / "WBC"
    for label in ("blasts", "basophils"):
        shutil.copytree(seed_shaped / label, data / label)
    run = settings.run_dir("p2")
    run_step(run / "split", lambda d: split_dataset(data, d, settings))
    victim = read_manifest(run / "split").iloc[0]["path"]
    (data / victim).write_bytes(b"")  # the file changed between the two steps
    summary = run_step(run / "preprocess", lambda d: preprocess_splits(run / "split", d, settings, 32))
    rejected = pd.read_csv(run / "preprocess" / "rejected.csv")
    assert list(rejected["path"]) == [victim] and summary["rejected"] == 1
    stored = sum(len(open_store(run / "preprocess" / s)) for s in ("train", "val", "test"))
    assert stored == len(read_manifest(run / "split")) - 1
