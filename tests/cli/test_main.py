"""The ``wbc`` command's own logic (commands that start Airflow are in test_embedded_commands)."""

from __future__ import annotations

import importlib
import json

import pytest

from wbc_tasks.cli.main import main
from wbc_tasks.data.images import load_image


def test_demo_data_drop_writes_unlabelled_images_for_the_nightly_run(settings, capsys):
    assert main(["demo-data", "--drop", "2026-12-02", "--count", "4", "--seed", "1"]) == 0
    reply = json.loads(capsys.readouterr().out)
    drop = settings.classify_dir / "2026-12-02"
    assert reply == {"drop": str(drop), "images": 4}
    files = sorted(drop.iterdir())
    assert len(files) == 4
    assert all(load_image(f, 32, max_pixels=10**6, min_side=8).shape == (32, 32, 3) for f in files)


@pytest.mark.parametrize("name", ["../outside", "a/b", ".."])
def test_demo_data_drop_must_be_a_folder_name(settings, name):
    with pytest.raises(SystemExit, match="give a folder name"):
        main(["demo-data", "--drop", name])
    assert not settings.classify_dir.exists()


@pytest.fixture
def airflow_conf(monkeypatch):
    """The conf each DAG command would hand Airflow (Airflow itself is not started)."""
    cli = importlib.import_module("wbc_tasks.cli.main")  # the package's ``main`` hides the module
    sent: list[tuple[str, dict]] = []

    def fake_airflow(settings, *args):
        sent.append((str(args[2]), json.loads(args[args.index("--conf") + 1])))
        return 0

    monkeypatch.setattr(cli, "run_airflow_command", fake_airflow)
    return sent


def test_classify_night_takes_a_model_version_as_the_string_the_form_declares(settings, airflow_conf):
    argv = ["classify-night", "--param", "model=2", "--param", "chunk_size=50", "--param", "threshold="]
    argv += ["--param", "reclassify=true", "--param", "drop=2026-11-24"]
    assert main(argv) == 0
    assert airflow_conf == [
        (
            "wbc_batch_classification",
            {"model": "2", "chunk_size": 50, "threshold": None, "reclassify": True, "drop": "2026-11-24"},
        )
    ]


@pytest.mark.parametrize(
    ("command", "param", "says"),
    [
        (
            "classify-night",
            "modle=2",
            "--param modle=2: unknown param 'modle'; known: chunk_size, drop, full_scan, model,",
        ),
        ("classify-night", "chunk_size=many", "--param chunk_size=many: chunk_size accepts an integer >= 1"),
        ("classify-night", "chunk_size=0", "--param chunk_size=0: chunk_size accepts an integer >= 1"),
        ("classify-night", "threshold=2", "threshold accepts a number >= 0 and <= 1 (empty: none)"),
        ("classify-night", "reclassify=perhaps", "reclassify accepts true or false"),
        ("classify-night", "model", "--param 'model': expected NAME=VALUE"),
        ("train", "weights=resnet", "--param weights=resnet: weights accepts one of imagenet, none"),
        ("train", "epochs_finetune=2.5", "epochs_finetune accepts an integer >= 0 and <= 500"),
    ],
)
def test_a_bad_param_is_one_line_naming_it_and_what_it_accepts(settings, airflow_conf, capsys, command, param, says):
    assert main([command, "--param", param]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wbc {command}: ") and says in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert airflow_conf == []  # refused before Airflow starts


def test_train_params_are_converted_by_their_declared_types(settings, airflow_conf):
    import wbc_tasks.cli.run_summary as run_summary
    from wbc_tasks.data.demo import generate_demo_dataset

    data = settings.home / "WBC"
    generate_demo_dataset(data, per_class=2, seed=0)
    argv = ["train", "--profile", "demo", "--param", f"data_dir={data}", "--param", "smote=false"]
    argv += ["--param", "learning_rate_finetune=1e-4", "--param", "seed=7", "--param", "max_ece="]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_summary, "summarise_training", lambda *a: ("summary", True))
        assert main(argv) == 0
    [(dag_id, conf)] = airflow_conf
    assert dag_id == "wbc_training"
    assert conf["data_dir"] == str(data) and conf["smote"] is False and conf["seed"] == 7
    assert conf["learning_rate_finetune"] == 1e-4 and conf["max_ece"] is None and conf["image_size"] == 32


def test_promote_records_the_user_setting(settings, monkeypatch):
    import wbc_tasks.registry.promotion as promotion

    seen = {}
    monkeypatch.setattr(promotion, "promote_version", lambda s, version, who, why: seen.update(who=who) or {})
    monkeypatch.setenv("WBC_USER", "dr.lee")
    assert main(["promote", "3", "--why", "better"]) == 0 and seen["who"] == "dr.lee"
    assert main(["promote", "3", "--why", "better", "--who", "dr.kim"]) == 0 and seen["who"] == "dr.kim"
