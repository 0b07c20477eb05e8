"""What lies in the classify folder: every file under it (or under one drop), with the link
policy and the settle time applied, and each file's sha256. It only reads the folder; the
``files_seen`` rows it reuses hashes from are passed in.

Rules:
- A file's *drop* is its first-level folder (``""`` for a file lying directly in the classify
  folder). Sub-folders of a drop are scanned.
- Files modified (mtime or ctime) within ``settings.settle_minutes`` may still be copying: they
  are set aside and picked up by a later run.
- Symlinks are followed only into the classify folder or ``settings.allowed_roots``; anything
  else (a link out, a broken link, a symlink loop, a second link to a folder already scanned)
  becomes a rejection. A file that vanishes between listing and reading (a drop folder renamed
  mid-run) is rejected with :data:`~wbc_tasks.data.images.DISAPPEARED` and no content hash.
- A file's sha256 is reused from ``files_seen`` when its size and mtime are unchanged (as make
  and rsync do), so a nightly scan does not re-read the whole archive of drops.
- A path that is not valid UTF-8 (a name copied from an old share) cannot be stored as text: the
  file is rejected under its name with the odd bytes written ``\\xNN`` (:data:`NOT_UTF8`), and a
  folder with such a name is no drop of its own (never skipped as finished).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC
from operator import attrgetter
from pathlib import Path
from stat import S_ISREG
from typing import Any

from wbc_tasks.core.settings import IMAGE_EXTENSIONS, Settings
from wbc_tasks.data.images import (
    DISAPPEARED,
    ImageError,
    resolve_within,
    sha256_of_file,
)

_by_name = attrgetter("name")

#: The rejection of a file whose path is not valid UTF-8.
NOT_UTF8 = "file name is not valid UTF-8 (its odd bytes are shown as \\xNN): rename it to classify it"


def storable(name: str) -> bool:
    """Whether ``name`` (as the file system gave it) can be stored as text: valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escaped(name: str) -> str:
    """``name`` as text any database stores: bytes that are not UTF-8 written ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class FoundFile:
    """A file under the classify folder (``path`` relative to it, as recorded)."""

    path: str
    drop: str
    size: int | None = None
    mtime: float | None = None
    sha256: str = ""
    #: The inode's change time: a copy tool can set the mtime back, never this.
    ctime: float | None = None


@dataclass
class Listing:
    """What a scan of the classify folder found."""

    files: list[FoundFile] = field(default_factory=list)
    #: (relative path, reason): entries that cannot be read as files at all.
    rejected: list[tuple[str, str]] = field(default_factory=list)
    #: Files left for a later run because they changed within the settle time.
    settling: list[str] = field(default_factory=list)

    def reject(self, path: str, reason: str) -> None:
        """Record ``path`` as rejected; both texts escaped (a reason may quote an odd name)."""
        self.rejected.append((escaped(path), escaped(reason)))


def drop_of(rel: Path) -> str:
    """The drop of a path relative to the classify folder: its first folder, or ``""``."""
    return rel.parts[0] if len(rel.parts) > 1 else ""


def allowed_roots(settings: Settings) -> tuple[Path, ...]:
    """The folders links may lead into: the classify folder and ``settings.allowed_roots``."""
    return (settings.classify_dir.resolve(), *settings.allowed_roots)


def _inside(target: Path, roots: Sequence[Path]) -> bool:
    return any(target == root or target.is_relative_to(root) for root in roots)


def _scan_root(settings: Settings, drop: str | None) -> Path:
    base = settings.classify_dir
    if not base.is_dir():
        raise FileNotFoundError(
            f"classify folder {base} does not exist; set WBC_CLASSIFY_DIR to the folder lab staff drop images into"
        )
    if not drop:
        return base
    if Path(drop).name != drop or drop in (".", ".."):
        raise ValueError(f"drop {drop!r} must be the name of a folder directly in {base}")
    root = base / drop
    if not root.is_dir():
        raise FileNotFoundError(f"drop folder {root} does not exist")
    if not _inside(root.resolve(), allowed_roots(settings)):
        raise ValueError(f"drop folder {root} points outside the allowed folders")
    return root


def drops_in(settings: Settings) -> list[str]:
    """The drops of the classify folder: its first-level folders (the archive folder excepted),
    and ``""`` when files lie loose in it."""
    archive = settings.archive_dir.resolve() if settings.archive_dir else None
    drops = []
    loose = False
    for entry in sorted(os.scandir(_scan_root(settings, None)), key=_by_name):
        if entry.is_dir():
            if storable(entry.name) and (archive is None or Path(entry.path).resolve() != archive):
                drops.append(entry.name)
        else:
            loose = True
    return ([LOOSE] if loose else []) + drops


#: The drop of files lying directly in the classify folder.
LOOSE = ""


def drop_fingerprint(settings: Settings, drop: str) -> str | None:
    """What a drop holds, as one sha256: every entry under it (sub-folders too) with its type,
    size, and modification and change times in nanoseconds. ``None`` when it cannot be listed or
    holds a symlink (what a link points at may change without a trace here): such a drop is
    always scanned.

    The change time (``ctime``) cannot be set by a copy tool, so the fingerprint changes with a
    file rewritten in place at the same size, or copied by ``rsync -a`` with its old mtime, as
    well as with a file added, removed or renamed anywhere in the drop. Only stats, no reads.
    """
    base = settings.classify_dir
    digest = hashlib.sha256()
    top = base / drop if drop != LOOSE else base
    # Each entry's path relative to the classify folder is its folder's prefix and its name:
    # building a Path per file cost two thirds of the time at 1 M files (issue 31).
    stack = [(os.fspath(top), "" if drop == LOOSE else f"{drop}/")]
    try:
        if drop != LOOSE and top.is_symlink():
            return None
        while stack:
            folder, prefix = stack.pop()
            lines = []
            for entry in sorted(os.scandir(folder), key=_by_name):
                if drop == LOOSE and entry.is_dir():  # another drop, a linked folder too
                    continue
                if entry.is_symlink():
                    return None
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, f"{prefix}{entry.name}/"))
                    continue
                st = entry.stat(follow_symlinks=False)
                lines.append(f"{prefix}{entry.name}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n")
            # surrogateescape: a name that is not UTF-8 is hashed as its bytes, not an error.
            digest.update("".join(lines).encode("utf-8", "surrogateescape"))
    except OSError:
        return None
    return digest.hexdigest()


def list_files(
    settings: Settings,
    *,
    drop: str | None = None,
    now: float | None = None,
    skip_drops: frozenset[str] = frozenset(),
) -> Listing:
    """Every file under the classify folder (or one drop), with symlinks checked and settling
    files set aside. Paths are recorded as found (a link's own path), relative to the folder.
    Drops named in ``skip_drops`` (``""``: the loose files) are not listed."""
    base = settings.classify_dir
    root = _scan_root(settings, drop)
    roots = allowed_roots(settings)
    archive = settings.archive_dir.resolve() if settings.archive_dir else None
    settle_seconds = settings.settle_minutes * 60.0
    now = time.time() if now is None else now
    listing = Listing()
    visited = {root.resolve()}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            # Real entries before links, so a real folder is scanned under its own path.
            entries = sorted(os.scandir(folder), key=lambda e: (e.is_symlink(), e.name))
        except OSError as exc:  # e.g. the drop folder was renamed since it was listed
            listing.reject(str(folder.relative_to(base)), f"cannot list folder: {exc}")
            continue
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(base)
            if skip_drops and folder == base and (entry.name if entry.is_dir() else LOOSE) in skip_drops:
                continue
            try:
                # Outside the roots, broken, a loop (path.resolve() used to raise on one and
                # crash the run) or gone since scandir: a rejection with the reason.
                target = resolve_within(path, roots)
            except ImageError as exc:
                listing.reject(str(rel), exc.reason)
                continue
            if archive is not None and (target == archive or target.is_relative_to(archive)):
                continue
            if target.is_dir():
                if target in visited:
                    # Recorded, not skipped silently: a link back up the tree, or a second link.
                    listing.reject(str(rel), f"symlink loop or second path to folder {target} (already scanned)")
                    continue
                visited.add(target)
                stack.append(path)
                continue
            if not storable(str(rel)):
                listing.reject(str(rel), NOT_UTF8)
                continue
            _add_file(listing, rel, target, now - settle_seconds)
    listing.files.sort(key=lambda f: f.path)
    return listing


def _add_file(listing: Listing, rel: Path, target: Path, settled_before: float) -> None:
    """File ``rel`` (resolved to ``target``) into ``listing``: found, settling or rejected."""
    try:
        stat = target.stat()
    except FileNotFoundError:
        listing.reject(str(rel), DISAPPEARED)
        return
    except OSError as exc:
        listing.reject(str(rel), f"cannot read file: {exc}")
        return
    if not S_ISREG(stat.st_mode):
        listing.reject(str(rel), "not a regular file")
        return
    # ctime too: `cp -p` / `rsync -t` give a fresh copy an old mtime.
    if max(stat.st_mtime, stat.st_ctime) > settled_before:
        listing.settling.append(str(rel))
        return
    listing.files.append(FoundFile(str(rel), drop_of(rel), stat.st_size, stat.st_mtime, ctime=stat.st_ctime))


def _hash(path: Path) -> tuple[str, str | None]:
    try:
        return sha256_of_file(path), None
    except FileNotFoundError:
        return "", DISAPPEARED
    except OSError as exc:
        return "", f"cannot read file: {exc}"


def hash_files(
    settings: Settings,
    files: Sequence[FoundFile],
    known: dict[str, list[dict[str, Any]]],
) -> list[tuple[FoundFile, str]]:
    """Set each file's sha256: reused from ``known`` (``files_seen`` rows by path) when size and
    mtime are unchanged and the file has not changed since the row was recorded (its ctime: a
    file rewritten at the same size with its mtime set back is read again), else read (in
    threads: this is I/O). Returns the files that could not be read, with the reason."""
    to_hash = []
    for found in files:
        same = [
            row
            for row in known.get(found.path, [])
            if row["sha256"]
            and row["size"] == found.size
            and row["mtime"] == found.mtime
            and _unchanged_since(found, row)
        ]
        if same:
            found.sha256 = same[0]["sha256"]
        else:
            to_hash.append(found)
    unreadable = []
    with ThreadPoolExecutor(max_workers=settings.worker_count()) as pool:
        results = pool.map(lambda f: _hash(settings.classify_dir / f.path), to_hash)
        for found, (digest, error) in zip(to_hash, results, strict=True):
            found.sha256 = digest
            if error:
                unreadable.append((found, error))
    return unreadable


def _unchanged_since(found: FoundFile, row: dict[str, Any]) -> bool:
    """Whether ``found``'s inode has not changed since ``row`` was recorded (no ctime or no
    record time to compare: as before, size and mtime decide)."""
    seen_at = row.get("seen_at")
    if found.ctime is None or seen_at is None:
        return True
    if seen_at.tzinfo is None:  # SQLite keeps no offset; every timestamp is stored in UTC
        seen_at = seen_at.replace(tzinfo=UTC)
    return found.ctime <= seen_at.timestamp()


def unsupported_reason(path: str) -> str:
    """The rejection reason of a file whose extension is not an image type we read."""
    suffix = Path(path).suffix or "(none)"
    return f"unsupported file type '{suffix}'; accepted: {', '.join(sorted(IMAGE_EXTENSIONS))}"
