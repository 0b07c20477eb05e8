"""Drops a night can skip: a drop that an earlier night finished (every file classified or
rejected, none settling) and whose fingerprint (:func:`wbc_tasks.serving.scan.drop_fingerprint`)
is unchanged is not listed, hashed nor looked up again, so a night costs what is new, not the
whole history (issue 31). The ``full_scan`` param, ``reclassify`` and a drop named by hand scan
everything as before.

The find step computes each drop's fingerprint before listing it, skips the unchanged finished
ones, and writes the fingerprints of the drops it finished listing (none settling, none that
could not be listed) to the run's work folder; the summarise step, which runs only when every
chunk was committed, records them in ``drop_scans``. A drop that changed after its fingerprint
was taken gets another fingerprint the next night and is scanned again.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine

from wbc_tasks.core.settings import Settings
from wbc_tasks.core.workdir import write_json_atomic
from wbc_tasks.serving import predictions as db
from wbc_tasks.serving.scan import Listing, drop_fingerprint, drop_of, drops_in

log = logging.getLogger(__name__)

#: The file in a run's work folder with the fingerprints the summarise step records.
FINISHED_FILE = "drops_finished.json"


def fingerprint_drops(settings: Settings) -> dict[str, str | None]:
    """Every drop of the classify folder and its fingerprint (None: always scanned)."""
    return {drop: drop_fingerprint(settings, drop) for drop in drops_in(settings)}


def unchanged_finished_drops(settings: Settings, engine: Engine, fingerprints: dict[str, str | None]) -> set[str]:
    """The drops whose fingerprint equals the one recorded when a night finished them."""

    def read(connection: Connection) -> dict[str, str]:
        rows = connection.execute(select(db.drop_scans.c.drop, db.drop_scans.c.fingerprint))
        return {drop: fingerprint for drop, fingerprint in rows}

    finished = db.read_with_retries(settings, engine, read, what="reading the drops finished earlier")
    return {d for d, fp in fingerprints.items() if fp is not None and finished.get(d) == fp}


def write_finished(
    work: Path, listing: Listing, fingerprints: dict[str, str | None], vanished: Collection[str] = ()
) -> Path:
    """The fingerprints of the listed drops that this night finishes when its chunks commit:
    none of their files settling or gone while read (``vanished``: their drops), every folder of
    them listed."""
    unfinished = {drop_of(Path(p)) for p in listing.settling} | set(vanished)
    # A folder that could not be listed names itself: its drop is its first part.
    unfinished |= {Path(p).parts[0] for p, reason in listing.rejected if reason.startswith("cannot list folder")}
    files = Counter(f.drop for f in listing.files)
    files.update(drop_of(Path(p)) for p, _ in listing.rejected)
    finished = [
        {"drop": drop, "fingerprint": fp, "files": files.get(drop, 0)}
        for drop, fp in fingerprints.items()
        if fp is not None and drop not in unfinished
    ]
    path = work / FINISHED_FILE
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, finished)
    return path


def record_finished(
    settings: Settings, run_id: str, found: dict[str, Any], chunks: Sequence[dict[str, Any]] = ()
) -> int:
    """Record the drops the find step listed as finished (its ``drops_finished_file``), less those
    where a chunk met a file that changed or vanished; returns how many. Called once every chunk
    of the run was committed."""
    path = found.get("drops_finished_file")
    if not path or not Path(path).is_file():
        return 0
    unfinished = {drop for chunk in chunks for drop in chunk.get("unfinished_drops", [])}
    finished = [row for row in json.loads(Path(path).read_text()) if row["drop"] not in unfinished]
    now = db.utcnow()
    rows = [{**row, "finished_at": now, "dag_run_id": run_id} for row in finished]
    with db.open_engine(settings.predictions_db_url) as engine:
        db.transaction(
            settings,
            engine,
            lambda connection: db.upsert(connection, db.drop_scans, rows, key=("drop",)),
            what="recording the drops finished",
        )
    log.info("%d drops finished: the next night skips them unless they change", len(rows))
    return len(rows)
