"""Pseudonymised file names (WBC_PSEUDONYMISE_NAMES): nothing that names a patient's file leaves
the work folder for MLflow or a task log; the real steps against a real MLflow (SQLite in tmp)."""

from __future__ import annotations

import json
import logging
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import write_image
from wbc_tasks.core.privacy import pseudonymiser
from wbc_tasks.core.settings import get_settings


def pseudonymise_path(path, settings) -> str:
    """The pseudonym the pipeline writes for ``path`` under ``settings``."""
    return pseudonymiser(settings).path(path)


#: What a lab's file names carry; must never reach MLflow or a log line with the option on.
PATIENT = "PATIENT-12345"
RUN_PARAMS = {"image_size": 32, "augment_per_class": 4, "smote": False, "batch_size": 4, "weights": "none"}


@pytest.fixture(scope="module")
def mlflow_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def labelled(tmp_path) -> Path:
    """Images named after a (fake) patient: good ones, one with a space, a duplicate of it, a
    corrupt file and a folder that is no class."""
    data = tmp_path / "lab" / "WBC"
    for c, cls in enumerate(("blasts", "neutrophils")):
        for i in range(3):
            write_image(data / cls / f"{PATIENT}_cell{i}.jpg", size=(40, 40), seed=10 * c + i)
    spaced = write_image(data / "blasts" / f"{PATIENT} a.jpg", size=(40, 40), seed=99)
    shutil.copyfile(spaced, data / "blasts" / f"{PATIENT}_zcopy.jpg")  # "duplicate of ... a.jpg"
    (data / "blasts" / f"{PATIENT}_bad.jpg").write_bytes(b"not an image at all")
    write_image(data / PATIENT / "x.jpg", size=(40, 40), seed=98)  # "unknown class folder ..."
    return data


@pytest.fixture
def env(settings, labelled, mlflow_dir, tmp_path, monkeypatch):
    """Environment of the steps: this test's data and work folders, the module's MLflow, and
    fractions that force the split's fallback (its note names a file)."""
    import mlflow

    monkeypatch.setenv("WBC_DATA_DIR", str(labelled))
    monkeypatch.setenv("WBC_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("WBC_MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_dir / 'mlflow.db'}")
    monkeypatch.setenv("WBC_MLFLOW_ARTIFACT_ROOT", str(mlflow_dir / "artifacts"))
    monkeypatch.setenv("WBC_MLFLOW_RETRY_WAIT", "0")
    monkeypatch.setenv("WBC_TEST_FRACTION", "0")
    monkeypatch.setenv("WBC_VAL_FRACTION", "0")
    yield monkeypatch
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _fake_training(run_id: str) -> None:
    """An untrained model where the train step puts its model (training itself is not the point)."""
    from wbc_tasks.core.workdir import run_step
    from wbc_tasks.training.model import build_model

    def build(out: Path) -> dict:
        model = build_model(32, 9, weights="none", settings=get_settings(), dense_units=8)
        model.save(out / "model.keras")
        return {"model_path": str(out / "model.keras")}

    run_step(get_settings().run_dir(run_id) / "train", build)


def _everything_in_mlflow(run_id_of_dag: str, dst: Path) -> dict[str, str]:
    """Every artifact of the DAG run's MLflow run (by path) as text, plus its params, tags and
    dataset inputs, keyed ``mlflow:<what>``."""
    from wbc_tasks.registry.client import configure_mlflow
    from wbc_tasks.registry.runs import find_tracking_run

    settings = get_settings()
    client = configure_mlflow(settings)
    run_id = find_tracking_run(settings, run_id_of_dag)
    folder = Path(client.download_artifacts(run_id, "", str(dst)))
    found = {
        str(p.relative_to(folder)): p.read_bytes().decode("utf-8", "replace")
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    run = client.get_run(run_id)
    found["mlflow:params"] = json.dumps(run.data.params)
    found["mlflow:tags"] = json.dumps(run.data.tags)
    found["mlflow:inputs"] = json.dumps(
        [
            {
                "name": d.dataset.name,
                "source": d.dataset.source,
                "schema": d.dataset.schema,
                "profile": d.dataset.profile,
                "digest": d.dataset.digest,
            }
            for d in run.inputs.dataset_inputs
        ]
    )
    return found


def _log_text(caplog) -> str:
    return "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)


def test_with_the_option_on_no_patient_name_reaches_mlflow_or_the_logs(env, labelled, tmp_path, caplog):
    from wbc_tasks.core.privacy import KEY_FILE
    from wbc_tasks.pipelines import training as steps

    env.setenv("WBC_PSEUDONYMISE_NAMES", "true")
    caplog.set_level(logging.INFO)
    run_id = "manual__pseudonymised"
    split = steps.split_step(run_id, RUN_PARAMS)
    steps.preprocess_step(run_id, RUN_PARAMS)
    steps.augment_step(run_id, RUN_PARAMS)
    steps.balance_step(run_id, RUN_PARAMS)
    _fake_training(run_id)
    steps.calibrate_step(run_id, RUN_PARAMS)
    evaluated = steps.evaluate_step(run_id, RUN_PARAMS)

    settings = get_settings()
    key = settings.work_dir / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "generated a pseudonym key" in _log_text(caplog)

    artifacts = _everything_in_mlflow(run_id, tmp_path / "downloaded")
    assert {
        "data/split/manifest.csv",
        "data/split/rejected.csv",
        "data/augment/records.csv",
        "data/balance/records.csv",
        "evaluation/predictions.csv",
        "evaluation/misclassified.png",
    } <= set(artifacts)
    leaks = [name for name, text in artifacts.items() if PATIENT.split("-")[0] in name + text]
    assert not leaks, f"patient names in MLflow: {leaks}"
    logs = _log_text(caplog)
    assert PATIENT.split("-")[0] not in logs
    # What Airflow logs as the tasks' return values.
    assert PATIENT not in json.dumps(split) + json.dumps(evaluated)
    assert split["split_fallbacks"], "the fractions of this test force a fallback note"

    # ... while the pseudonyms are there, the same in every place, class folders kept.
    cell = pseudonymise_path(f"blasts/{PATIENT}_cell0.jpg", settings)
    spaced = pseudonymise_path(f"blasts/{PATIENT} a.jpg", settings)
    bad = pseudonymise_path(f"blasts/{PATIENT}_bad.jpg", settings)
    assert cell.startswith("blasts/anon-") and cell.endswith(".jpg")
    manifest = pd.read_csv(tmp_path / "downloaded" / "data/split/manifest.csv")
    assert cell in set(manifest["path"]) and len(manifest) == 7
    rejected = pd.read_csv(tmp_path / "downloaded" / "data/split/rejected.csv").set_index("path")["reason"]
    assert rejected[bad].startswith("not a readable image")
    assert rejected[pseudonymise_path(f"blasts/{PATIENT}_zcopy.jpg", settings)] == f"duplicate of {spaced}"
    assert pseudonymise_path(PATIENT, settings) in rejected[pseudonymise_path(f"{PATIENT}/x.jpg", settings)]
    tested = set(pd.read_csv(tmp_path / "downloaded" / "evaluation/predictions.csv")["path"])
    assert tested and all(p.split("/")[0] in ("blasts", "neutrophils") and "/anon-" in p for p in tested)
    assert f"rejected {bad}: not a readable image" in logs

    # The work folder keeps the real names: the lab needs them, and they stay on its machines.
    real = pd.read_csv(settings.run_dir(run_id) / "split" / "manifest.csv")
    assert f"blasts/{PATIENT}_cell0.jpg" in set(real["path"])


def test_with_the_option_off_names_are_logged_as_they_are(env, tmp_path, caplog):
    from wbc_tasks.pipelines import training as steps

    caplog.set_level(logging.INFO)
    run_id = "manual__plain"
    split = steps.split_step(run_id, RUN_PARAMS)

    artifacts = _everything_in_mlflow(run_id, tmp_path / "downloaded")
    assert f"blasts/{PATIENT}_cell0.jpg" in artifacts["data/split/manifest.csv"]
    assert f"duplicate of blasts/{PATIENT} a.jpg" in artifacts["data/split/rejected.csv"]
    assert f"rejected blasts/{PATIENT}_bad.jpg: not a readable image" in _log_text(caplog)
    assert any(PATIENT in note for note in split["split_fallbacks"])
    assert not (get_settings().work_dir / ".pseudonym_key").exists(), "no key made while off"


# ------------------------------------------------------------------ the pseudonym itself


def test_pseudonyms_are_stable_keyed_and_keep_class_and_extension(settings, tmp_path):
    from wbc_tasks.core.privacy import Pseudonymiser

    on = settings.with_overrides(pseudonymise_names=True, pseudonym_key="k" * 32, data_dir=tmp_path / "WBC")
    name = f"blasts/2024/{PATIENT}_cell.JPG"
    first = pseudonymise_path(name, on)
    assert first == pseudonymise_path(name, on) == Pseudonymiser(b"k" * 32).path(name)
    assert first.startswith("blasts/anon-") and first.endswith(".JPG") and PATIENT not in first
    assert pseudonymise_path(tmp_path / "WBC" / name, on) == first  # absolute under the data folder
    assert pseudonymise_path(name, on.with_overrides(pseudonym_key="other-key-" * 3)) != first
    assert pseudonymise_path(f"blasts/{PATIENT}_cell.jpg", on) != pseudonymise_path(f"blasts/{PATIENT}_cel.jpg", on)
    assert pseudonymise_path(f"{PATIENT}.12345", on).count("12345") == 0  # no made-up "extension"
    assert pseudonymise_path(f"drop-1/{PATIENT}.png", on).startswith("anon-")  # not a class folder
    assert pseudonymise_path(name, settings) == name  # option off: unchanged
    assert "k" * 32 not in repr(on)


def test_a_missing_key_is_generated_once_and_a_short_one_refused(settings):
    from wbc_tasks.core.privacy import KEY_FILE

    on = settings.with_overrides(pseudonymise_names=True)
    first = pseudonymise_path("blasts/a.jpg", on)
    key = on.work_dir / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert pseudonymise_path("blasts/a.jpg", on) == first and key.read_text().strip()
    with pytest.raises(ValueError, match="WBC_PSEUDONYM_KEY is too short"):
        pseudonymise_path("blasts/a.jpg", on.with_overrides(pseudonym_key="short"))


def test_copies_of_csv_and_json_pseudonymise_path_fields_and_paths_in_text(settings, tmp_path):

    on = settings.with_overrides(pseudonymise_names=True, pseudonym_key="k" * 32)
    table = tmp_path / "rejected.csv"
    pd.DataFrame(
        {
            "path": [f"blasts/{PATIENT}_b.jpg", f"{PATIENT}/c.jpg"],
            "class": ["blasts", ""],
            "reason": [
                f"cannot open image: [Errno 13] Permission denied: '/else/{PATIENT} x.jpg'",
                f"unknown class folder '{PATIENT}'",
            ],
        }
    ).to_csv(table, index=False)
    copy = pd.read_csv(pseudonymiser(on).write_copy(table, tmp_path / "out" / "rejected.csv"))
    assert PATIENT not in copy.to_csv()
    assert list(copy["path"]) == [
        pseudonymise_path(f"blasts/{PATIENT}_b.jpg", on),
        pseudonymise_path(f"{PATIENT}/c.jpg", on),
    ]
    assert copy["reason"][1] == f"unknown class folder '{pseudonymise_path(PATIENT, on)}'"

    doc = tmp_path / "summary.json"
    doc.write_text(
        json.dumps(
            {
                "files": [{"path": f"d/{PATIENT}.jpg"}],
                "note": f"moved blasts/{PATIENT}.jpg",
                "model_uri": "models:/wbc/3",
                "store": str(on.work_dir / "runs" / "x"),
            }
        )
    )
    copied = json.loads(pseudonymiser(on).write_copy(doc, tmp_path / "out" / "summary.json").read_text())
    assert PATIENT not in json.dumps(copied)
    assert copied["files"][0]["path"] == pseudonymise_path(f"d/{PATIENT}.jpg", on)
    assert copied["model_uri"] == "models:/wbc/3" and copied["store"] == str(on.work_dir / "runs" / "x")
    plain = pseudonymiser(settings).write_copy(doc, tmp_path / "off" / "summary.json")
    assert plain.read_text() == doc.read_text()


def test_cli_prints_the_same_pseudonyms(settings, tmp_path, monkeypatch, capsys):
    from wbc_tasks.cli import main

    data = tmp_path / "WBC"
    image = write_image(data / "blasts" / f"{PATIENT}_cell.jpg")
    assert main(["pseudonym", "blasts/x.jpg"]) == 2  # no key anywhere: says so, makes none
    assert "no pseudonym key" in capsys.readouterr().err

    monkeypatch.setenv("WBC_PSEUDONYM_KEY", "lab-secret-" * 3)
    assert main(["pseudonym", "--root", str(data), str(data)]) == 0
    line = capsys.readouterr().out.strip()
    on = get_settings().with_overrides(pseudonymise_names=True)
    assert line == f"{pseudonymise_path(f'blasts/{PATIENT}_cell.jpg', on)}\t{image}"
    assert main(["pseudonym", f"blasts/{PATIENT}_cell.jpg"]) == 0
    assert capsys.readouterr().out.split("\t")[0] == line.split("\t")[0]


def test_nightly_rejections_are_logged_by_pseudonym(settings, tmp_path, caplog):
    from wbc_tasks.registry.versions import ModelRef
    from wbc_tasks.serving import plan

    on = settings.with_overrides(
        pseudonymise_names=True,
        pseudonym_key="k" * 32,
        settle_minutes=0.0,
        classify_dir=tmp_path / "drops",
        predictions_db_url=f"sqlite:///{tmp_path / 'predictions.db'}",
    )
    (on.classify_dir / "2024-05-01").mkdir(parents=True)
    (on.classify_dir / "2024-05-01" / f"{PATIENT} notes.txt").write_text("not an image")
    model = ModelRef("wbc", "1", "r", "models:/wbc/1", 32, ("blasts", "neutrophils"))
    caplog.set_level(logging.INFO)
    found = plan.find_new_images(on, run_id="night", model=model)

    assert found["files_rejected"] == 1
    logs = _log_text(caplog)
    assert PATIENT.split("-")[0] not in logs
    shown = pseudonymise_path(f"2024-05-01/{PATIENT} notes.txt", on)
    assert f"rejected {shown}: unsupported file type '.txt'" in logs and shown.startswith("anon-")
