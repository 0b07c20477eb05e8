"""``wbc backup`` and ``wbc restore``: the embedded state's backup drill from the command line
(the work itself is :mod:`wbc_tasks.ops.backup`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TypeAlias

from wbc_tasks.core.settings import Settings

#: What ``add_subparsers`` returns (argparse does not name the type publicly).
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    from wbc_tasks.ops.backup import BackupError, backup_embedded

    try:
        manifest = backup_embedded(settings, Path(args.out).expanduser())
    except BackupError as exc:
        print(f"wbc backup: {exc}", file=sys.stderr)
        return 1
    rows = {db: {t: v["rows"] for t, v in tables.items()} for db, tables in manifest["tables"].items()}
    shown = {"out": str(Path(args.out).expanduser().resolve()), "taken_at": manifest["taken_at"],
             "files": len(manifest["files"]), "seconds": manifest["seconds"], "rows": rows}  # fmt: skip
    print(json.dumps(shown, indent=2))
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    from wbc_tasks.ops.backup import BackupError, restore_embedded

    try:
        summary = restore_embedded(Path(args.backup).expanduser(), settings, replace=args.replace)
    except BackupError as exc:
        print(f"wbc restore: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def add_backup_commands(sub: Subcommands) -> None:
    backup = sub.add_parser(
        "backup", help="a consistent copy of the embedded state (WBC_HOME), taken while everything runs"
    )
    backup.add_argument("--out", required=True, help="a new or empty folder outside WBC_HOME")
    backup.set_defaults(func=cmd_backup)
    restore = sub.add_parser(
        "restore", help="restore a backup into an empty WBC_HOME (checked against its manifest first)"
    )
    restore.add_argument("backup", help="the folder `wbc backup --out` wrote")
    restore.add_argument(
        "--replace", action="store_true", help="WBC_HOME is not empty: move it aside (never deleted) and restore"
    )
    restore.set_defaults(func=cmd_restore)
