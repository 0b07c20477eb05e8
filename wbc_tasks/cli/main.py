"""The ``wbc`` command: the pipeline for people and scripts, without writing Python.

wbc train [--profile cpu|demo|gpu] [--param name=value ...]   run wbc_training end to end
wbc classify-night [--param ...]                               run wbc_batch_classification once
wbc predictions [--format csv|parquet|json] [filters]           fetch the predictions table
wbc report DROP [--format html|csv|json] [--out FILE]           a drop's differential report
wbc reviews export --out DIR                                    reviewed images as <class>/<file>
wbc classify PATH...                                            classify a few images now
wbc promote VERSION --why TEXT / wbc rollback --why TEXT        move the champion by hand
wbc airflow-ui / wbc mlflow-ui                                  open the UIs on the same state
wbc demo-data [--per-class N] | --drop NAME [--count N]         write generated demo images
wbc cleanup [--dry-run] [--mlflow-artifacts]                    delete old run work folders
wbc pseudonym [--root DIR] PATH...                              the pseudonyms of your files
wbc backup --out DIR / wbc restore DIR [--replace]               back up / restore the embedded state
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import UTC
from pathlib import Path
from typing import Any, TypeAlias

from wbc_tasks.cli.backup_commands import add_backup_commands
from wbc_tasks.cli.embedded import airflow_environment, run_airflow_command, run_airflow_ui, run_mlflow_ui
from wbc_tasks.cli.params import ParamInputError, parse_params
from wbc_tasks.core.settings import Settings, get_settings
from wbc_tasks.core.vocabulary import REVIEW_REASONS, DagId
from wbc_tasks.pipelines.params import classification_param_specs, training_param_specs
from wbc_tasks.training.profiles import PROFILES

#: What ``add_subparsers`` returns (argparse does not name the type publicly).
_Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _check_before_airflow(settings: Settings, conf: dict[str, Any]) -> None:
    """The checks that would fail the run's first task, made here in a second instead of after
    Airflow has started: params, weights, the data folder."""
    from wbc_tasks.data.labelled_folder import check_data_folder
    from wbc_tasks.pipelines.data_folder import configured_data_dir
    from wbc_tasks.training.model import vgg16_weights_file
    from wbc_tasks.training.params import Weights, training_params

    params = training_params(conf)
    if params.weights == Weights.IMAGENET:
        vgg16_weights_file(settings)
    data_dir = configured_data_dir(settings, params)
    if data_dir is not None:  # None: the run trains on generated demo data
        check_data_folder(data_dir)


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import datetime

    from wbc_tasks.cli.run_summary import summarise_training
    from wbc_tasks.core.errors import PermanentError

    given = parse_params(args.param, training_param_specs())
    conf = {**PROFILES.get(args.profile, {}), **given}
    if settings.data_dir is None and "data_dir" not in conf and args.profile == "cpu":
        # No data configured: the demo profile is the one that learns generated images quickly.
        conf = {**PROFILES["demo"], **given}
        print("WBC_DATA_DIR is not set: training on generated demo data (profile 'demo').")
    try:
        _check_before_airflow(settings, conf)
    except PermanentError as exc:
        print(f"wbc train: {exc}", file=sys.stderr)
        return 2
    print(f"{DagId.TRAINING} with {json.dumps(conf, sort_keys=True)}", flush=True)
    started = datetime.now(UTC)
    code = run_airflow_command(settings, "dags", "test", DagId.TRAINING, "--conf", json.dumps(conf))
    if code >= 128:  # stopped by a signal: the run did not finish, say so and nothing more
        return code
    summary, succeeded = summarise_training(
        settings, Path(airflow_environment(settings)["AIRFLOW_HOME"]), started, code
    )
    print(summary, flush=True)
    return code if code else (0 if succeeded else 1)


def cmd_classify_night(args: argparse.Namespace, settings: Settings) -> int:
    conf = parse_params(args.param, classification_param_specs(settings))
    return run_airflow_command(settings, "dags", "test", DagId.NIGHTLY, "--conf", json.dumps(conf))


def cmd_predictions(args: argparse.Namespace, settings: Settings) -> int:
    from wbc_tasks.serving.export import PredictionFilter
    from wbc_tasks.serving.export_stream import export_predictions

    where = PredictionFilter(
        drop=args.drop,
        since=args.since,
        predicted_class=args.predicted_class,
        needs_review={"yes": True, "no": False}.get(args.needs_review) if args.needs_review else None,
        review_reason=args.review_reason,
        model_version=args.model_version,
        latest=args.latest,
    )
    rows = export_predictions(settings, where, fmt=args.format, out=args.out)
    if args.out:
        print(f"{rows} rows written to {args.out}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from wbc_tasks.serving.report import ReportError
    from wbc_tasks.serving.report_rendering import write_report

    try:
        text = write_report(settings, args.drop, args.format, args.out, model_version=args.model_version)
    except ReportError as exc:
        print(f"wbc report: {exc}", file=sys.stderr)
        return 2
    if args.out:
        print(f"{args.format} report of drop {args.drop!r} written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_reviews_export(args: argparse.Namespace, settings: Settings) -> int:
    from wbc_tasks.serving.review_decisions import ReviewError
    from wbc_tasks.serving.review_export import export_reviewed

    try:
        summary = export_reviewed(settings, Path(args.out))
    except ReviewError as exc:
        print(f"wbc reviews export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_classify(args: argparse.Namespace, settings: Settings) -> int:
    from wbc_tasks.serving.single import classify_paths

    results = classify_paths(settings, [Path(p) for p in args.paths], model_ref=args.model, record=args.record)
    print(json.dumps(results, indent=2, default=str))
    return 0 if all("rejected" not in r for r in results) else 3


def _who(args: argparse.Namespace, settings: Settings) -> str:
    """Who moved the champion: ``--who``, else ``WBC_USER``, else the login name."""
    return args.who or settings.user or getpass.getuser()


def cmd_promote(args: argparse.Namespace, settings: Settings) -> int:
    from wbc_tasks.registry.promotion import promote_version

    result = promote_version(settings, str(args.version), who=_who(args, settings), why=args.why)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from wbc_tasks.registry.promotion import rollback

    result = rollback(settings, who=_who(args, settings), why=args.why)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_airflow_ui(args: argparse.Namespace, settings: Settings) -> int:
    return run_airflow_ui(settings, host=args.host, port=args.port)


def cmd_mlflow_ui(args: argparse.Namespace, settings: Settings) -> int:
    return run_mlflow_ui(settings, host=args.host, port=args.port)


def cmd_cleanup(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from wbc_tasks.ops.cleanup import apply_retention

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    summary = apply_retention(settings, dry_run=args.dry_run, mlflow_artifacts=args.mlflow_artifacts or None)
    print(json.dumps(summary, indent=2, default=str))
    return 1 if summary["errors"] or summary.get("mlflow", {}).get("errors") else 0


def cmd_demo_data(args: argparse.Namespace, settings: Settings) -> int:
    from wbc_tasks.data.demo import generate_demo_dataset, generate_demo_drop

    if args.drop:
        # Unlabelled images for the nightly run, for a lab without images of its own yet.
        if Path(args.drop).name != args.drop or args.drop in (".", ".."):
            raise SystemExit(f"--drop {args.drop!r}: give a folder name (e.g. 2026-12-02), not a path")
        drop = settings.classify_dir / args.drop
        paths = generate_demo_drop(drop, args.count, args.seed)
        print(json.dumps({"drop": str(drop), "images": len(paths)}, indent=2))
        return 0
    out = Path(args.out) if args.out else settings.home / "demo-data" / "WBC"
    summary = generate_demo_dataset(out, per_class=args.per_class, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_pseudonym(args: argparse.Namespace, settings: Settings) -> int:
    """Print ``<pseudonym>\t<path>`` for each file (folders: every file under them), so a
    pseudonym seen in MLflow or a log can be found again among the lab's own files."""
    from wbc_tasks.core.privacy import key_file, pseudonymiser

    if settings.pseudonym_key is None and not key_file(settings).is_file():
        print(
            f"no pseudonym key: set WBC_PSEUDONYM_KEY, or WBC_WORK_DIR to the pipeline's work folder "
            f"(its {key_file(settings).name}); {key_file(settings)} does not exist",
            file=sys.stderr,
        )
        return 2
    root = Path(args.root).expanduser().absolute() if args.root else None
    names = pseudonymiser(settings.with_overrides(pseudonymise_names=True), *([root] if root else []))
    for given in args.paths:
        path = Path(given).expanduser()
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in found:
            shown = file.absolute() if root is not None else file
            print(f"{names.path(shown)}\t{file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``wbc`` argument parser: one sub-command per entry of the module docstring."""
    parser = argparse.ArgumentParser(
        prog="wbc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_dag_commands(sub)
    _add_prediction_commands(sub)
    _add_champion_commands(sub)
    _add_ui_commands(sub)
    _add_housekeeping_commands(sub)
    add_backup_commands(sub)
    return parser


def _add_dag_commands(sub: _Subcommands) -> None:
    """``train`` and ``classify-night``: a DAG run on the embedded Airflow."""
    train = sub.add_parser("train", help="run the wbc_training DAG end to end (embedded Airflow)")
    train.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    train.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    train.set_defaults(func=cmd_train)

    night = sub.add_parser("classify-night", help="run the wbc_batch_classification DAG once")
    night.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    night.set_defaults(func=cmd_classify_night)


def _add_prediction_commands(sub: _Subcommands) -> None:
    """``predictions``, ``report``, ``reviews export`` and ``classify``: the predictions table."""
    preds = sub.add_parser("predictions", help="fetch the predictions table (csv, parquet or json)")
    preds.add_argument("--format", choices=["csv", "parquet", "json"], default="csv")
    preds.add_argument("--out", help="file to write (default: standard output; parquet needs --out)")
    preds.add_argument("--drop", help="only this drop (sub-folder of the classify folder)")
    preds.add_argument("--since", help="only files seen / predictions made at or after this ISO time")
    preds.add_argument("--class", dest="predicted_class", help="only this predicted class")
    preds.add_argument("--needs-review", choices=["yes", "no"], help="only flagged (yes) or unflagged (no)")
    preds.add_argument(
        "--review-reason", choices=REVIEW_REASONS, help="only predictions flagged for this reason (among others)"
    )
    preds.add_argument("--model-version", help="only predictions of this model version")
    preds.add_argument("--latest", action="store_true", help="only the newest prediction per file")
    preds.set_defaults(func=cmd_predictions)

    report = sub.add_parser("report", help="a drop's differential report: counts per class, review, flags")
    report.add_argument("drop", help="the drop (sub-folder of the classify folder); '' for loose files")
    report.add_argument("--format", choices=["html", "csv", "json"], default="html")
    report.add_argument("--out", help="file to write (default: standard output)")
    report.add_argument("--model-version", help="this version's predictions (default: each image's newest)")
    report.set_defaults(func=cmd_report)

    reviews = sub.add_parser("reviews", help="reviewed cells")
    reviews_sub = reviews.add_subparsers(dest="reviews_command", required=True)
    export = reviews_sub.add_parser(
        "export",
        help="write every reviewed image as DIR/<class>/<file> (hard links where possible, else copies; "
        "'unusable' ones left out and listed)",
    )
    export.add_argument("--out", required=True, help="folder to write into (outside the classify folder)")
    export.set_defaults(func=cmd_reviews_export)

    classify = sub.add_parser("classify", help="classify a few images now, without Airflow")
    classify.add_argument("paths", nargs="+")
    classify.add_argument("--model", help="alias or version (default: the champion)")
    classify.add_argument("--record", action="store_true", help="also store the rows in the predictions database")
    classify.set_defaults(func=cmd_classify)


def _add_champion_commands(sub: _Subcommands) -> None:
    """``promote`` and ``rollback``: move the champion by hand."""
    promote = sub.add_parser("promote", help="make VERSION the champion by hand (recorded on the version)")
    promote.add_argument("version", type=int)
    promote.add_argument("--why", required=True, help="reason, recorded with who and when")
    promote.add_argument("--who", help="defaults to $WBC_USER or the login name")
    promote.set_defaults(func=cmd_promote)
    back = sub.add_parser("rollback", help="make the previous champion the champion again")
    back.add_argument("--why", required=True)
    back.add_argument("--who")
    back.set_defaults(func=cmd_rollback)


def _add_ui_commands(sub: _Subcommands) -> None:
    """``airflow-ui`` and ``mlflow-ui`` on the embedded state."""
    ui = sub.add_parser(
        "airflow-ui",
        help="Airflow's UI (and scheduler, DAG processor, triggerer) on the embedded state, until Ctrl-C",
    )
    ui.add_argument("--port", type=int, default=8080)
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ui.set_defaults(func=cmd_airflow_ui)
    mlui = sub.add_parser("mlflow-ui", help="MLflow's UI on the embedded tracking database, until Ctrl-C")
    mlui.add_argument("--port", type=int, default=5000)
    mlui.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    mlui.set_defaults(func=cmd_mlflow_ui)


def _add_housekeeping_commands(sub: _Subcommands) -> None:
    """``demo-data``, ``cleanup`` and ``pseudonym``."""
    demo = sub.add_parser("demo-data", help="write the generated demo image set")
    demo.add_argument("--out")
    demo.add_argument("--per-class", type=int, default=40)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--drop", metavar="NAME", help="instead: an unlabelled drop NAME in the classify folder")
    demo.add_argument("--count", type=int, default=50, help="images in the --drop (default 50)")
    demo.set_defaults(func=cmd_demo_data)

    cleanup = sub.add_parser(
        "cleanup",
        help="delete training work folders older than WBC_RETENTION_DAYS beyond the newest "
        "WBC_RETENTION_KEEP_RUNS (never the champion's or previous champion's, nor running ones)",
    )
    cleanup.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    cleanup.add_argument(
        "--mlflow-artifacts",
        action="store_true",
        help="also delete the MLflow artifacts of old runs that never registered a version "
        "(default: WBC_RETENTION_MLFLOW_ARTIFACTS)",
    )
    cleanup.set_defaults(func=cmd_cleanup)

    pseudonym = sub.add_parser(
        "pseudonym",
        help="print the pseudonym (WBC_PSEUDONYMISE_NAMES) of each file, to find one seen in MLflow or a log",
    )
    pseudonym.add_argument("paths", nargs="+", help="files, or folders (every file under them)")
    pseudonym.add_argument(
        "--root",
        help="the folder the paths were relative to in the pipeline (the data folder of a training "
        "run, the classify folder); default: WBC_DATA_DIR, WBC_CLASSIFY_DIR, WBC_ARCHIVE_DIR, "
        "else the paths as given",
    )
    pseudonym.set_defaults(func=cmd_pseudonym)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, get_settings()) or 0)
    except ParamInputError as exc:  # a --param the table refuses: one line, no traceback
        print(f"wbc {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
