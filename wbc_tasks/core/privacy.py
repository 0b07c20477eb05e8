"""Pseudonyms for image file names in what leaves the lab's folders (MLflow, task logs).

File names may carry patient identifiers (``PATIENT-12345_cell.jpg``). With
``WBC_PSEUDONYMISE_NAMES=true`` every image path that goes to MLflow (the split manifest and
rejections, store ``records.csv`` files, ``predictions.csv``, ...) or into a task log line is
replaced by a keyed pseudonym::

    blasts/PATIENT-12345_cell.jpg  ->  blasts/anon-3f9c0a4e1b2d7c68.jpg

the first 16 hex digits of HMAC-SHA256(key, path), keeping the extension (when it is a known
one) and the class folder (a class name says nothing about the patient). Paths are hashed as
written relative to their folder (the labelled folder, the classify folder); an absolute path
under one of those folders is made relative first, so both spellings get one pseudonym. The
same key gives the same pseudonym in every run; without the key nobody can test a guessed name.
``wbc pseudonym PATH...`` prints the pseudonym of the lab's own files, to find one again.

The key is ``WBC_PSEUDONYM_KEY`` (at least 16 characters); unset, one is generated once into
``<WBC_WORK_DIR>/.pseudonym_key`` (mode 0600; the work folder is shared by every worker) and
reused. The work folders and the predictions database keep real paths: they stay on the lab's
machines and the lab needs them. With the option off every function here returns its input.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from wbc_tasks.core.settings import IMAGE_EXTENSIONS, Settings
from wbc_tasks.core.vocabulary import CLASS_NAMES

log = logging.getLogger(__name__)

#: File (under ``settings.work_dir``) holding the generated key when ``WBC_PSEUDONYM_KEY`` is unset.
KEY_FILE = ".pseudonym_key"
MIN_KEY_CHARS = 16
PREFIX = "anon-"
DIGEST_CHARS = 16
#: Extensions a pseudonym keeps; any other suffix (``PATIENT.12345``) is part of the hashed name.
KEPT_EXTENSIONS = IMAGE_EXTENSIONS | {".gif", ".webp", ".dcm", ".txt", ".csv", ".json", ".zip", ".pdf"}
#: CSV columns and JSON keys that hold paths.
PATH_FIELDS = frozenset({"path", "paths", "file", "files", "filename", "file_name", "source_path"})

_CLASS_FOLDERS = {name.lower() for name in CLASS_NAMES}
_PSEUDONYM = re.compile(rf"(?:^|/){re.escape(PREFIX)}[0-9a-f]{{{DIGEST_CHARS}}}(?:\.[A-Za-z0-9]+)?$")
#: Free text is cut into tokens at these characters; a token holding a slash or ending in a known
#: extension is taken for a path.
_TOKEN = re.compile(r"[^\s'\"()\[\]{},;<>|`]+")
_QUOTED_PATH = re.compile(r"""(['"])([^'"\n]*[/\\][^'"\n]*)\1""")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # models:/x, s3://x, http://x (not C:/x)
#: Where a known path may start (after) and end (before) inside free text.
_STARTS = frozenset(" \t\n'\"([{,;:=`")
_ENDS = frozenset(" \t\n'\")]},;:.`")


class KnownPaths(frozenset[str]):
    """Paths (and their parent folders) to look for in free text, as :meth:`Pseudonymiser.known` built them."""


class Pseudonymiser:
    """Pseudonyms with one key (``key=None``: the option is off and names pass unchanged)."""

    def __init__(self, key: bytes | None, *, roots: Iterable[Path | str] = (), keep: Iterable[Path | str] = ()) -> None:
        self.key = key
        #: Folders whose absolute paths are made relative before hashing (data and classify folders).
        self.roots = tuple(dict.fromkeys(Path(r) for r in roots))
        #: Folders whose paths in free text are the pipeline's own and left alone (the work folder).
        self.keep = tuple(dict.fromkeys(str(Path(k)) for k in keep))
        self._cache: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return self.key is not None

    # ---------------------------------------------------------------- one path

    def path(self, path: str | os.PathLike[str]) -> str:
        """The pseudonym of ``path`` (``str(path)`` when off; ``""`` stays ``""``)."""
        text = os.fspath(path)
        if self.key is None or text == "":
            return text
        cached = self._cache.get(text)
        if cached is None:
            cached = self._cache[text] = self._pseudonym(text)
        return cached

    def _relative(self, text: str) -> PurePosixPath | None:
        """``text`` as hashed: relative to the first root holding it; None for a root itself."""
        posix = PurePosixPath(Path(text).as_posix())
        if posix.is_absolute():
            for root in self.roots:
                root_posix = PurePosixPath(root.as_posix())
                if posix == root_posix:
                    return None
                if posix.is_relative_to(root_posix):
                    return posix.relative_to(root_posix)
        return posix

    def _pseudonym(self, text: str) -> str:
        posix = self._relative(text)
        if posix is None or self.key is None:
            return text  # a configured folder is not a patient's file name
        digest = hmac.new(self.key, str(posix).encode("utf-8"), hashlib.sha256).hexdigest()[:DIGEST_CHARS]
        suffix = posix.suffix if posix.suffix.lower() in KEPT_EXTENSIONS else ""
        folders = [part for part in posix.parts[:-1] if part.lower() in _CLASS_FOLDERS]
        name = f"{PREFIX}{digest}{suffix}"
        return f"{folders[-1]}/{name}" if folders else name

    def under(self, folder: Path | str, relative: str | os.PathLike[str]) -> str:
        """``folder/relative`` for a log line: the folder as is, the relative path pseudonymised."""
        if self.key is None:
            return str(Path(folder) / relative)
        return str(Path(folder) / self.path(relative))

    # ---------------------------------------------------------------- free text

    def known(self, paths: Iterable[str]) -> KnownPaths:
        """``paths`` and their parent folders (class folders excepted), to find in free text
        (``duplicate of blasts/PATIENT 12 a.jpg``, ``unknown class folder 'PATIENT-12'``)."""
        if self.key is None:
            return KnownPaths()
        found: set[str] = set()
        for path in paths:
            text = str(path)
            if not text or text in found:
                continue
            found.add(text)
            parent = PurePosixPath(text).parent
            while str(parent) not in (".", "/", "") and parent.name.lower() not in _CLASS_FOLDERS:
                found.add(str(parent))
                parent = parent.parent
        # The same paths written absolute (an error message quoting the file it could not open).
        relative = [p for p in found if not PurePosixPath(p).is_absolute()]
        for root in self.roots:
            found.update(str(PurePosixPath(root.as_posix()) / p) for p in relative)
        return KnownPaths(found)

    def text(self, text: str, known: Iterable[str] = ()) -> str:
        """``text`` with the paths in it pseudonymised: first the ``known`` ones (found whole,
        spaces included), then every other token that looks like a path (holds a slash or ends in
        a known extension). Paths under the work folder and URIs are left alone."""
        if self.key is None or not text:
            return text
        if known:
            table = known if isinstance(known, KnownPaths) else self.known(known)
            if table:
                text = self._replace_known(text, table)
        text = _QUOTED_PATH.sub(self._quoted, text)
        return _TOKEN.sub(self._token, text)

    def _quoted(self, match: re.Match[str]) -> str:
        """A quoted path (``[Errno 13] Permission denied: '/a/PATIENT 12.jpg'``): whole, spaces and all."""
        inner = match.group(2)
        if _URI.match(inner) or _PSEUDONYM.search(inner) or self._kept(inner):
            return match.group(0)
        return f"{match.group(1)}{self.path(inner)}{match.group(1)}"

    def _kept(self, path: str) -> bool:
        return any(path == k or path.startswith(k + os.sep) for k in self.keep)

    def _replace_known(self, text: str, known: KnownPaths) -> str:
        longest = max(map(len, known))
        starts = [0] + [i + 1 for i, c in enumerate(text) if c in _STARTS]
        ends = sorted({len(text), *(i for i, c in enumerate(text) if c in _ENDS)}, reverse=True)
        out, done = [], 0
        for start in starts:
            if start < done:
                continue
            for end in ends:
                if end <= start:
                    break
                if end - start <= longest and text[start:end] in known:
                    out += [text[done:start], self.path(text[start:end])]
                    done = end
                    break
        out.append(text[done:])
        return "".join(out)

    def _token(self, match: re.Match[str]) -> str:
        token = match.group(0)
        core = token.rstrip(".:")
        tail = token[len(core) :]
        if not core or _URI.match(core) or _PSEUDONYM.search(core):
            return token
        looks_like_path = "/" in core or "\\" in core or PurePosixPath(core).suffix.lower() in KEPT_EXTENSIONS
        if not looks_like_path or self._kept(core):
            return token
        return self.path(core) + tail

    # ---------------------------------------------------------------- files

    def csv_paths(self, source: Path) -> list[str]:
        """The values of a CSV file's path columns (to find them in the other columns' text)."""
        table = _read_csv(source)
        if table is None:
            return []
        return [v for c in table.columns if c.lower() in PATH_FIELDS for v in table[c]]

    def write_copy(self, source: Path, target: Path, known: Iterable[str] = ()) -> Path:
        """Write a pseudonymised copy of a CSV or JSON file: path columns/fields replaced by
        their pseudonyms, paths in other text (a rejection's reason) too. Other files are copied."""
        import shutil

        source, target = Path(source), Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = source.suffix.lower()
        if self.key is None or suffix not in (".csv", ".json"):
            shutil.copyfile(source, target)
            return target
        if suffix == ".csv":
            table = _read_csv(source)
            if table is None:  # an empty file: nothing to hide
                shutil.copyfile(source, target)
                return target
            path_columns = [c for c in table.columns if c.lower() in PATH_FIELDS]
            known = self.known([*known, *(v for c in path_columns for v in table[c])])
            for column in table.columns:
                if column in path_columns:
                    table[column] = table[column].map(self.path)
                else:
                    table[column] = table[column].map(lambda v: self.text(v, known))
            table.to_csv(target, index=False)
            return target
        payload = json.loads(source.read_text())
        known = self.known([*known, *_json_paths(payload)])
        target.write_text(json.dumps(self.json(payload, known), indent=2, sort_keys=True))
        return target

    def json(self, value: Any, known: Iterable[str] = (), *, is_path: bool = False) -> Any:
        """A JSON-able value with paths pseudonymised (values of :data:`PATH_FIELDS` keys whole,
        paths inside other strings as in :meth:`text`)."""
        if self.key is None:
            return value
        if isinstance(value, str):
            return self.path(value) if is_path else self.text(value, known)
        if isinstance(value, dict):
            return {
                self.text(str(k), known): self.json(v, known, is_path=str(k).lower() in PATH_FIELDS)
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [self.json(v, known, is_path=is_path) for v in value]
        return value


def _read_csv(path: Path) -> Any:  # -> pandas.DataFrame | None (pandas imported lazily)
    """A CSV file as strings, exactly as written (None for an empty file)."""
    import pandas as pd

    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return None


def _json_paths(value: Any, is_path: bool = False) -> list[str]:
    if isinstance(value, str):
        return [value] if is_path else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _json_paths(v, str(k).lower() in PATH_FIELDS)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _json_paths(v, is_path)]
    return []


# -------------------------------------------------------------------- the key


def key_file(settings: Settings) -> Path:
    return settings.work_dir / KEY_FILE


def pseudonym_key(settings: Settings) -> bytes:
    """The HMAC key: ``WBC_PSEUDONYM_KEY``, else the work folder's key file, created once."""
    if settings.pseudonym_key is not None:
        if len(settings.pseudonym_key) < MIN_KEY_CHARS:
            raise ValueError(
                f"WBC_PSEUDONYM_KEY is too short ({len(settings.pseudonym_key)} characters; at least "
                f"{MIN_KEY_CHARS}): a short key lets anyone test guessed file names against pseudonyms"
            )
        return settings.pseudonym_key.encode("utf-8")
    path = key_file(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{KEY_FILE}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
            try:
                os.link(tmp, path)  # only if absent: two first tasks agree on one key
                log.info(
                    "WBC_PSEUDONYMISE_NAMES is on and WBC_PSEUDONYM_KEY is unset: generated a "
                    "pseudonym key in %s (keep it: the same key gives the same pseudonyms)",
                    path,
                )
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("pseudonym key file %s is readable by others (mode %o); chmod 600 it", path, mode)
    key = path.read_text().strip()
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"pseudonym key file {path} holds no usable key (fewer than {MIN_KEY_CHARS} characters)")
    return key.encode("utf-8")


def pseudonymiser(settings: Settings, *roots: Path | str) -> Pseudonymiser:
    """The pseudonymiser of ``settings`` (a pass-through when ``WBC_PSEUDONYMISE_NAMES`` is off).

    ``roots``: folders (besides the configured data, classify and archive folders) whose
    absolute paths are made relative before hashing.
    """
    if not settings.pseudonymise_names:
        return Pseudonymiser(None)
    configured = [settings.data_dir, settings.classify_dir, settings.archive_dir]
    return Pseudonymiser(
        pseudonym_key(settings),
        roots=[Path(r) for r in (*roots, *configured) if r is not None],
        keep=[settings.work_dir],
    )
