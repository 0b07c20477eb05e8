"""The labelled folder's layout: whether a folder can be trained on at all
(:func:`check_data_folder`, which the ``wbc train`` command also runs before starting Airflow)
and walking one class folder, links followed only into the allowed folders
(:func:`walk_class_folder`). :mod:`wbc_tasks.data.dataset` builds the split on these.
"""

from __future__ import annotations

import os
from pathlib import Path

from wbc_tasks.core.errors import PermanentError
from wbc_tasks.core.vocabulary import CLASS_NAMES
from wbc_tasks.data.images import ImageError, resolve_within


class DatasetError(PermanentError, ValueError):
    """The labelled folder cannot be trained on at all."""


def walk_class_folder(folder: Path, roots: tuple[Path, ...]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files under ``folder`` at any depth (as found: a link's own path) and the entries that
    cannot be files, with reasons. Folder links are followed into ``roots``, each folder once:
    ``rglob`` skipped linked folders silently and crashed on a symlink loop (RuntimeError)."""
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    visited = {folder.resolve()}
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            # Real entries before links, so a real folder is scanned under its own path.
            entries = sorted(os.scandir(current), key=lambda e: (e.is_symlink(), e.name))
        except OSError as exc:  # vanished or unreadable since listed
            problems.append((current, f"cannot list folder: {exc.strerror or exc}"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                target = resolve_within(path, roots) if entry.is_symlink() else path
            except ImageError as exc:
                problems.append((path, exc.reason))
                continue
            if entry.is_dir():  # follows a link, like target.is_dir()
                real = target.resolve()
                if real in visited:
                    problems.append((path, f"symlink loop or second path to folder {real} (already scanned)"))
                    continue
                visited.add(real)
                stack.append(path)
            elif entry.is_file():
                files.append(path)
            else:
                problems.append((path, "not a regular file"))
    return sorted(files), problems


def class_folders(folder: Path) -> list[str]:
    """Names of the known class folders directly in ``folder`` that hold at least one file."""
    known = {name.lower() for name in CLASS_NAMES}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        try:
            if entry.name.lower() in known and entry.is_dir() and any(p.is_file() for p in entry.rglob("*")):
                found.append(entry.name)
        except (OSError, RuntimeError):  # unreadable folder, symlink loop: the split reports it
            continue
    return found


def check_data_folder(data_dir: Path) -> None:
    """Fail in seconds, saying what was found, when ``data_dir`` cannot be trained on: missing,
    not a folder, or fewer than two class folders with files in it. Suggests the folder one
    level down that holds class folders (a common slip: pointing at the folder above ``WBC/``)."""
    if not data_dir.is_dir():
        raise DatasetError(
            f"data folder {data_dir} does not exist or is not a folder (WBC_DATA_DIR or the data_dir param)"
        )
    classes = class_folders(data_dir)
    if len(classes) >= 2:
        return
    try:
        others = sorted(e.name for e in data_dir.iterdir() if e.is_dir() and e.name not in classes)
    except OSError as exc:
        raise DatasetError(f"data folder {data_dir} cannot be listed: {exc}") from exc
    found = (
        f"class folders with images: {', '.join(classes) or 'none'}; "
        f"other folders: {', '.join(others[:10]) or 'none'}{' ...' if len(others) > 10 else ''}"
    )
    hints = []
    for name in others:
        below = class_folders(data_dir / name)
        if len(below) >= 2:
            hints.append(f"{data_dir / name} holds class folders ({', '.join(below)}): did you mean that folder?")
    if data_dir.name.lower() in {c.lower() for c in CLASS_NAMES}:
        hints.append(
            f"{data_dir.name} is a class name: point at the folder that holds the class folders, {data_dir.parent}"
        )
    raise DatasetError(
        f"{data_dir}: training needs images in at least two class folders "
        f"({', '.join(CLASS_NAMES)}); found {found}." + (" " + " ".join(hints) if hints else "")
    )
