"""Paths in outputs: relative to the root the user gave, without the patient's name or ids in them.

A *root* is a file or folder named on the command line. An output path is the file's path relative
to the root's parent folder (so it starts with the root's own name: `export/DOE_JANE_4711/oct.dcm`),
with the root's id (`r0` is the first PATH argument; a store numbers the roots it has seen).

Automatic redaction: a path component that contains one of the file's own identifiers (PatientName,
PatientID, AccessionNumber from its header, or a `.vol` export's patient id) is replaced by the
patient's pseudonym. Matching rule (:func:`tokens`): identifiers and components are split on
every character that is not a letter or digit (``^ _ - .``, space, comma, apostrophe, ...), compared
case-insensitively as whole tokens, and only tokens of at least MIN_TOKEN characters count. So
``DOE^JANE`` matches ``doe_jane_4711`` and ``Doe, Jane``, an ID of ``1`` matches nothing, and
``JANEWAY`` does not match ``JANE``.

`--redact-paths` replaces every component with a keyed pseudonym (:func:`redact_every_component`).
What this does not cover (pixels, burned-in text, names spelled differently) is in docs/reliability.md.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from retinacli.privacy import pseudonym

SEPARATORS = re.compile(r"[\W_]+")  # every character that is not a letter or digit
MIN_TOKEN = 3
_EXTENSION = re.compile(r"^\.[A-Za-z0-9]{1,5}$")
_WORD = re.compile(r"[^\s()\[\]{},;:'\"/\\]+")  # a file name or word inside a message
_FILE_WORD = re.compile(r"^.+\.[A-Za-z][A-Za-z0-9]{0,4}$")
_REDACTED = re.compile(r"^c[0-9a-f]{10}(\.[A-Za-z0-9]{1,5})?$")  # what redact_every_component makes


def tokens(text: str | None) -> set[str]:
    """The matching tokens of a name or path component: split on every character that is not a letter
    or digit, lower-cased, at least MIN_TOKEN characters."""
    if not text:
        return set()
    return {t.casefold() for t in SEPARATORS.split(str(text)) if len(t) >= MIN_TOKEN}


def matches(component: str, identifiers: set[str]) -> bool:
    """Whether `component` holds one of the identifier tokens as a whole token."""
    return bool(tokens(component) & identifiers)


def meta_identifiers(meta: Any) -> tuple[str | None, list[str]]:
    """(the value the patient's pseudonym is made from, the identifier values) of an ImageMeta."""
    values = [getattr(meta, name, None) for name in ("patient_id", "patient_name", "accession_number")]
    values = [str(v) for v in values if v]
    return (values[0] if values else None), values


def _keep_extension(component: str) -> str:
    suffix = PurePosixPath(component).suffix
    return suffix if _EXTENSION.match(suffix) and suffix != component else ""


def redact_every_component(path: str, key: bytes) -> str:
    """Every component replaced by a keyed pseudonym (``c`` + 10 hex digits; a file keeps a short
    extension such as ``.dcm``). The same component always maps to the same pseudonym under one key,
    so results can still be grouped by folder. Idempotent: a component that is already such a
    pseudonym (a path stored by `embed --redact-paths`) is kept, so it matches the stored one."""
    parts = [p for p in PurePosixPath(path.replace(os.sep, "/")).parts if p not in ("/", "")]
    return "/".join(p if _REDACTED.match(p) else pseudonym(p, key, prefix="c", length=10) + _keep_extension(p)
                    for p in parts)


def file_identifiers(path: str | Path) -> list[str]:
    """Best effort, for a file that failed to read: the identifiers its header still gives (DICOM
    PatientName / PatientID / AccessionNumber, a `.vol` header's patient id, a HEYEX XML export's
    patient fields), else none."""
    path = Path(path)
    found: list[str] = []
    try:
        if path.suffix.lower() == ".xml" or not path.is_file():  # a HEYEX export: its XML, folder or series
            from retinacli.readers.heyex_xml import export_identifiers

            return export_identifiers(path)
        if path.suffix.lower() == ".vol":
            from retinacli.readers.heidelberg import read_vol_header

            pid = read_vol_header(path).patient_id
            return [pid] if pid else found
        import pydicom

        from retinacli.readers.dicom import check_deflated

        check_deflated(path)  # a deflated data set is inflated whole by dcmread: refuse a bomb first
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["PatientName", "PatientID", "AccessionNumber"])
        for name in ("PatientID", "PatientName", "AccessionNumber"):
            value = ds.get(name)
            if value:
                found.append(str(value))
    except Exception:  # not DICOM, or unreadable: nothing to learn
        return []
    return found


@dataclass(frozen=True)
class Root:
    """A file or folder the user named; `path` is absolute (made so lexically: `..` collapsed).

    In a store's `roots` the recorded `path` has the identifying components of the run's files
    replaced (or every one, after `embed --redact-paths`), and `path_key`, a keyed hash of the real
    absolute path, recognises the root on later runs."""

    id: str
    path: str
    path_key: str | None = None

    @property
    def base(self) -> str:
        """Output paths are relative to this folder: the root's parent."""
        return os.path.dirname(self.path.rstrip(os.sep)) or self.path

    def to_record(self) -> dict[str, str | None]:
        return {"id": self.id, "path": self.path, "path_key": self.path_key}


def absolute(path: str | Path) -> str:
    """An absolute path with `.` and `..` collapsed lexically (symlinks are not followed, so a path
    under a linked folder stays under the root that named it)."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def roots_for(paths: list[Path] | list[str], known: list[Root] | None = None,
              key: bytes | None = None) -> tuple[list[Root], list[Root]]:
    """(the roots `known` (a store's) plus one for each of `paths` not among them, numbered on;
    this run's roots, with their real paths). A known root is recognised by its `path_key` (keyed
    hash of the absolute path, with `key`) or, unredacted, by its path."""
    roots, run = list(known or []), []
    for path in paths:
        where = absolute(path)
        path_key = pseudonym(where, key, prefix="r", length=16) if key is not None else None
        found = next((r for r in roots if (path_key and r.path_key == path_key) or r.path == where), None)
        if found is None:
            found = Root(f"r{len(roots)}", where, path_key)
            roots.append(found)
        run.append(Root(found.id, where, path_key))
    return roots, run


class PathRedactor:
    """Turns file paths into output paths: (root id, path relative to the root's parent), with
    components naming the file's patient replaced, or every component with `redact_all`.

    `key`: the store's (or cohort manifest's) secret, so the replacements match the `patient`
    pseudonyms; without one a per-run random key is used. Identifiers learnt from any file of the run
    (:meth:`learn`) also apply to the paths of files whose headers could not be read.
    """

    def __init__(self, roots: list[Root], key: bytes | None = None, redact_all: bool = False):
        self.roots = sorted(roots, key=lambda r: len(r.path), reverse=True)  # innermost root first
        self.key = key if key is not None else secrets.token_bytes(32)
        self.redact_all = redact_all
        self._owner: dict[str, str] = {}  # identifier token -> the value its pseudonym is made from
        self._lock = threading.RLock()  # embed's reader threads learn while others redact

    @classmethod
    def for_paths(cls, paths: list[Path] | list[str], key: bytes | None = None,
                  redact_all: bool = False) -> PathRedactor:
        return cls(roots_for(paths)[1], key, redact_all)

    def learn(self, meta: Any = None, values: list[str] | None = None, owner: str | None = None) -> None:
        """Remember a file's identifiers (from its ImageMeta, or raw `values`)."""
        if meta is not None:
            owner, values = meta_identifiers(meta)
        with self._lock:
            for value in values or []:
                for token in tokens(value):
                    self._owner.setdefault(token, owner or value)

    def locate(self, path: str | Path) -> tuple[str | None, str]:
        """(root id, path relative to the root's parent), or (None, the absolute path) outside every root."""
        where = absolute(path)
        for root in self.roots:
            if where == root.path or where.startswith(root.path.rstrip(os.sep) + os.sep):
                rel = os.path.relpath(where, root.base)
                return root.id, PurePosixPath(Path(rel).as_posix()).as_posix()
        return None, where

    def redact(self, path: str, own: list[str] | None = None) -> str:
        """`path` (relative or absolute) with identifying components replaced (or every one)."""
        if self.redact_all:
            return ("/" if path.startswith("/") else "") + redact_every_component(path, self.key)
        if own:
            self.learn(values=own, owner=own[0])
        own_tokens = set().union(*map(tokens, own)) if own else set()
        parts = path.split("/")
        with self._lock:
            for i, part in enumerate(parts):
                if tokens(part) & own_tokens:  # the file's own patient first: a shared surname is his
                    parts[i] = pseudonym(own[0], self.key, prefix="p") + _keep_extension(part)
                    continue
                hit = sorted(tokens(part) & self._owner.keys())
                if hit:
                    parts[i] = pseudonym(self._owner[hit[0]], self.key, prefix="p") + _keep_extension(part)
        return "/".join(parts)

    def scrub(self, text: str) -> str:
        """A message (an error reason naming a member file, say) with every word that holds an
        identifier learnt in this run replaced by that patient's pseudonym; with `redact_all`, every
        word that looks like a file name (`name.ext`) replaced by its keyed pseudonym too."""
        with self._lock:
            if not self._owner and not self.redact_all:
                return text

            def replace(match: re.Match) -> str:
                word = match.group()
                if self.redact_all and _FILE_WORD.match(word):
                    return redact_every_component(word, self.key)
                hit = sorted(tokens(word) & self._owner.keys())
                if not hit:
                    return word
                return pseudonym(self._owner[hit[0]], self.key, prefix="p") + _keep_extension(word)

            return _WORD.sub(replace, text)

    def output(self, path: str | Path, meta: Any = None, probe: bool = False) -> tuple[str | None, str]:
        """(root id, output path) of a file. `meta`: its ImageMeta when read; `probe`: read its
        header for identifiers (a file that failed to read)."""
        if meta is not None:
            self.learn(meta)
            own = meta_identifiers(meta)[1]  # ahead of tokens other files taught
        else:
            own = file_identifiers(path) if probe and not self.redact_all else None
        root_id, rel = self.locate(path)
        return root_id, self.redact(rel, own)

    def error(self, path: str | Path, reason: str) -> tuple[str, str]:
        """(output path, reason) of a failure: the file's header is probed for identifiers, and
        the reason is scrubbed of the identifiers known (a member file's name in it, say)."""
        shown = self.show(path, probe=True)
        return shown, self.scrub(reason)

    def show(self, path: str | Path, meta: Any = None, probe: bool = False) -> str:
        """The output path alone, for messages and tables."""
        return self.output(path, meta, probe)[1]


def stored_path(row: dict[str, Any], key: bytes | None, redact_all: bool) -> str | None:
    """A store row's path for output: as stored (already relative and redacted from format 3 on;
    absolute in older stores), every component replaced with `redact_all`."""
    path = row.get("path")
    if not path or not redact_all or key is None:
        return path
    return ("/" if path.startswith("/") else "") + redact_every_component(path, key)
