"""The registry store: immutable, numbered, verified model versions on any pyarrow filesystem.

Layout::

    <root>/<name>/aliases.json            {"aliases": {alias: version}, "history": [...]}
    <root>/<name>/<version>/model.safetensors
    <root>/<name>/<version>/<document>.json   model.json, preprocessing.json, metrics.json, ...
    <root>/<name>/<version>/manifest.json     written last: sha256 and size of every other file

A version is built in `<root>/<name>/.staging-<uuid>/` and moved into place in one step; a version
directory without `manifest.json` does not exist as far as readers are concerned. On a local disk
the move is `os.rename`, which fails when the target exists, so concurrent registrations of one name
get distinct numbers. Object stores have no atomic rename: files are moved one by one, the manifest
last, and concurrent registrations of one name from separate processes are not guarded there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from kiln.errors import RegistryError
from kiln.registry.lineage import environment
from kiln.storage import is_uri
from kiln.storage import join as _join
from kiln.storage import read_bytes as _read_bytes
from kiln.storage import write_bytes as _write_bytes

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "./.kiln/registry"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
LINEAGE = "lineage.json"
ALIASES_FILE = "aliases.json"
LATEST = "latest"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION_RE = re.compile(r"^[1-9][0-9]*$")
_MAX_ATTEMPTS = 100
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_REF_FORMS = "expected NAME, NAME:VERSION or NAME@ALIAS (e.g. digits-mlp:3, digits-mlp@production)"


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model."""

    name: str
    version: int
    uri: str
    """The version directory: an absolute path for a local registry, else `scheme://...`."""
    created_at: str
    """When it was registered, UTC ISO-8601."""

    @property
    def ref(self) -> str:
        """The exact reference, `name:version`."""
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class LoadedVersion:
    """A model version read into memory: tensors, JSON documents, extra files and the manifest."""

    version: ModelVersion
    tensors: dict[str, torch.Tensor]
    documents: dict[str, dict[str, Any]]
    """Every `.json` file of the version except `manifest.json`, by file name."""
    manifest: dict[str, Any]
    extra_files: dict[str, bytes]
    """Files that are neither the tensors nor JSON documents, by file name."""


class Registry:
    """A model registry rooted at a local path or a pyarrow filesystem URI (`s3://...`, `gs://...`).

    Args:
        root: A local directory (created on first registration) or a URI for
            `pyarrow.fs.FileSystem.from_uri`.
        filesystem: An already configured pyarrow filesystem (custom endpoint, credentials); `root`
            is then a path inside it.
    """

    def __init__(self, root: str = DEFAULT_ROOT, *, filesystem: pafs.FileSystem | None = None):
        self.root = root
        self._fs, self._path, self._uri_base = _open_root(root, filesystem)
        self._local = isinstance(self._fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    # ---- writing -------------------------------------------------------------------------------

    def register(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        documents: dict[str, dict[str, Any]],
        *,
        extra_files: dict[str, bytes] | None = None,
    ) -> ModelVersion:
        """Store a new immutable version of `name` and return it.

        Args:
            name: Model name: 1-64 letters, digits, `_ . -`, starting with a letter or digit.
            tensors: Saved to `model.safetensors` (moved to CPU, made contiguous).
            documents: JSON documents by file name (`model.json`, `preprocessing.json`, ...).
                `lineage.json` gets an `environment` key unless the caller set one.
            extra_files: Other files by name (not `.json`), stored byte for byte.

        Returns:
            The new version; numbers count up from 1 per name and are never reused.
        """
        _check_name(name)
        files = _render_files(name, tensors, documents, extra_files or {})
        staging = _join(self._name_dir(name), f".staging-{uuid.uuid4().hex}")
        entries = {
            fname: {"sha256": _sha256(data), "size": len(data)} for fname, data in files.items()
        }
        try:
            self._fs.create_dir(staging, recursive=True)
            for fname, data in files.items():
                _write_bytes(self._fs, _join(staging, fname), data)
            version, created_at = self._publish(name, staging, entries)
        except OSError as exc:
            raise RegistryError(f"could not register {name} in {self.root}: {exc}") from exc
        finally:
            self._delete_quietly(staging)
        mv = ModelVersion(name, version, self._uri(name, version), created_at)
        logger.info("registered %s at %s", mv.ref, mv.uri)
        return mv

    def promote(self, ref: str, alias: str) -> ModelVersion:
        """Point `alias` (e.g. `production`) at the version `ref` resolves to; returns that version.

        An alias may move from one version to another; every move is kept in the alias history.
        """
        if not isinstance(alias, str) or not _ALIAS_RE.match(alias):
            raise RegistryError(
                f"invalid alias {alias!r}: use 1-32 letters, digits, '_' or '-', "
                "starting with a letter"
            )
        if alias == LATEST:
            raise RegistryError("alias 'latest' is reserved: it always means the newest version")
        mv = self.resolve(ref)
        doc = self._read_aliases(mv.name)
        previous = doc["aliases"].get(alias)
        doc["aliases"][alias] = mv.version
        doc["history"].append({"alias": alias, "version": mv.version, "at": _now()})
        self._write_atomic(_join(self._name_dir(mv.name), ALIASES_FILE), _dumps(doc, ALIASES_FILE))
        logger.info("%s@%s -> %d (was %s)", mv.name, alias, mv.version, previous)
        return mv

    # ---- reading -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The names that have at least one version, sorted."""
        dirs = [i.base_name for i in self._list(self._path) if i.type == pafs.FileType.Directory]
        return sorted(d for d in dirs if _NAME_RE.match(d) and self._visible_numbers(d))

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of `name`, oldest first."""
        return [self._model_version(name, n) for n in self._known_numbers(name)]

    def aliases(self, name: str) -> dict[str, int]:
        """The aliases of `name` and the version each points at (`latest` is implicit)."""
        self._known_numbers(name)
        return dict(self._read_aliases(name)["aliases"])

    def resolve(self, ref: str) -> ModelVersion:
        """Find the version a reference means: `name` or `name@latest` (newest), `name:3`,
        `name@production` (an alias)."""
        name, selector = _parse_ref(ref)
        numbers = self._known_numbers(name)
        if selector == LATEST:
            return self._model_version(name, numbers[-1])
        if isinstance(selector, int):
            if selector not in numbers:
                raise RegistryError(
                    f"{name}:{selector} does not exist; versions of {name}: {_listing(numbers)}"
                )
            return self._model_version(name, selector)
        return self._model_version(name, self._alias_target(name, selector, numbers))

    def read_document(self, mv: ModelVersion, filename: str) -> dict[str, Any]:
        """Read one JSON document of a version, checked against its manifest entry."""
        manifest = self._read_manifest(mv.name, mv.version)
        listed = manifest.get("files", {})
        if not filename.endswith(".json") or filename == MANIFEST or filename not in listed:
            documents = sorted(f for f in listed if f.endswith(".json"))
            raise RegistryError(
                f"{mv.ref} has no document {filename!r}; documents: {_listing(documents)}"
            )
        data = _read_bytes(self._fs, _join(self._version_dir(mv.name, mv.version), filename))
        _verify_file(mv.ref, filename, data, listed[filename])
        return _parse_json(data, f"{mv.ref}: {filename}")

    def load(self, ref: str, *, verify: bool = True) -> LoadedVersion:
        """Read a version into memory.

        Args:
            ref: Any reference `resolve` accepts.
            verify: Check every file against the manifest (sha256 and size) and refuse files that
                were added or removed after registration.
        """
        mv = self.resolve(ref)
        vdir = self._version_dir(mv.name, mv.version)
        manifest = self._read_manifest(mv.name, mv.version)
        data = {f: _read_bytes(self._fs, _join(vdir, f)) for f in self._files_in(vdir)}
        if verify:
            _verify_version(mv, manifest, data)
        documents = {
            f: _parse_json(blob, f"{mv.ref}: {f}")
            for f, blob in data.items()
            if f.endswith(".json")
        }
        extra = {f: blob for f, blob in data.items() if f != MODEL_FILE and not f.endswith(".json")}
        tensors = _load_tensors(mv.ref, data.get(MODEL_FILE))
        return LoadedVersion(mv, tensors, documents, manifest, extra)

    def show(self, ref: str) -> dict[str, Any]:
        """Everything about a version but the tensor data: manifest, documents, tensor names with
        dtypes and shapes, and the aliases pointing at it."""
        mv = self.resolve(ref)
        manifest = self._read_manifest(mv.name, mv.version)
        vdir = self._version_dir(mv.name, mv.version)
        documents = {
            f: self._read_json(_join(vdir, f), f"{mv.ref}: {f}")
            for f in sorted(manifest.get("files", {}))
            if f.endswith(".json")
        }
        aliases = sorted(a for a, v in self.aliases(mv.name).items() if v == mv.version)
        return {
            "ref": mv.ref,
            "uri": mv.uri,
            "created_at": mv.created_at,
            "aliases": aliases,
            "tensors": self._tensor_summary(mv),
            "manifest": manifest,
            "documents": documents,
        }

    # ---- internals -----------------------------------------------------------------------------

    def _publish(self, name: str, staging: str, entries: dict[str, Any]) -> tuple[int, str]:
        """Write the manifest and move the staging directory to the next free version number."""
        version = 0
        for _ in range(_MAX_ATTEMPTS):
            version = max(version, self._highest_number(name)) + 1
            created_at = _now()
            manifest = {
                "name": name,
                "version": version,
                "created_at": created_at,
                "files": entries,
            }
            _write_bytes(self._fs, _join(staging, MANIFEST), _dumps(manifest, MANIFEST))
            if self._move_into_place(staging, self._version_dir(name, version), list(entries)):
                return version, created_at
            logger.debug("%s:%d was taken by a concurrent registration; retrying", name, version)
        raise RegistryError(
            f"could not register {name}: {_MAX_ATTEMPTS} attempts each lost the race for the next "
            "version number to a concurrent registration"
        )

    def _move_into_place(self, staging: str, target: str, filenames: list[str]) -> bool:
        """Move staging to target; False when target is taken."""
        if self._local:
            try:
                os.rename(staging, target)
            except OSError:
                if os.path.lexists(target):
                    return False
                raise
            return True
        if self._list(target, recursive=True):
            return False
        self._fs.create_dir(target, recursive=True)
        moved: list[str] = []
        try:
            for fname in [*filenames, MANIFEST]:
                self._fs.move(_join(staging, fname), _join(target, fname))
                moved.append(_join(target, fname))
        except BaseException:
            for path in moved:
                self._delete_quietly(path, is_dir=False)
            raise
        return True

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Replace a file in one step: temp file + rename locally; a single put on object stores."""
        if not self._local:
            _write_bytes(self._fs, path, data)
            return
        parent, base = path.rsplit("/", 1)
        tmp = _join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
        try:
            _write_bytes(self._fs, tmp, data)
            os.replace(tmp, path)
        finally:
            self._delete_quietly(tmp, is_dir=False)

    def _alias_target(self, name: str, alias: str, numbers: list[int]) -> int:
        table = self._read_aliases(name)["aliases"]
        if alias not in table:
            listed = [f"{a} (-> {v})" for a, v in sorted(table.items())]
            known = f"aliases of {name}: {_listing(listed)}" if listed else f"{name} has no aliases"
            raise RegistryError(f"{name}@{alias}: no such alias; {known} (and @latest)")
        target = table[alias]
        if target not in numbers:
            raise RegistryError(
                f"{name}@{alias} points at version {target}, which does not exist; "
                f"versions of {name}: {_listing(numbers)}"
            )
        return int(target)

    def _read_aliases(self, name: str) -> dict[str, Any]:
        path = _join(self._name_dir(name), ALIASES_FILE)
        if self._fs.get_file_info(path).type != pafs.FileType.File:
            return {"aliases": {}, "history": []}
        doc = self._read_json(path, f"{name}: {ALIASES_FILE}")
        if not isinstance(doc.get("aliases"), dict) or not isinstance(doc.get("history"), list):
            raise RegistryError(
                f"{name}: {ALIASES_FILE} needs an 'aliases' object and a 'history' list"
            )
        return doc

    def _known_numbers(self, name: str) -> list[int]:
        """Visible version numbers of `name`, ascending; an error naming known models if none."""
        _check_name(name)
        numbers = self._visible_numbers(name)
        if numbers:
            return numbers
        known = self.names()
        if not known:
            raise RegistryError(
                f"unknown model {name!r}: the registry {self.root} has no models yet"
            )
        raise RegistryError(
            f"unknown model {name!r} in registry {self.root}; known models: {_listing(known)}"
        )

    def _numbered_dirs(self, name: str) -> list[int]:
        infos = self._list(self._name_dir(name))
        return sorted(
            int(i.base_name)
            for i in infos
            if i.type == pafs.FileType.Directory and _VERSION_RE.match(i.base_name)
        )

    def _visible_numbers(self, name: str) -> list[int]:
        numbers = self._numbered_dirs(name)
        paths = [_join(self._version_dir(name, n), MANIFEST) for n in numbers]
        infos = self._fs.get_file_info(paths) if paths else []
        return [
            n for n, info in zip(numbers, infos, strict=True) if info.type == pafs.FileType.File
        ]

    def _highest_number(self, name: str) -> int:
        """The highest number in use, visible or not: a half-written directory is never reused."""
        numbers = self._numbered_dirs(name)
        return numbers[-1] if numbers else 0

    def _model_version(self, name: str, version: int) -> ModelVersion:
        manifest = self._read_manifest(name, version)
        return ModelVersion(
            name, version, self._uri(name, version), str(manifest.get("created_at"))
        )

    def _read_manifest(self, name: str, version: int) -> dict[str, Any]:
        path = _join(self._version_dir(name, version), MANIFEST)
        return self._read_json(path, f"{name}:{version}: {MANIFEST}")

    def _read_json(self, path: str, what: str) -> dict[str, Any]:
        try:
            data = _read_bytes(self._fs, path)
        except FileNotFoundError as exc:
            raise RegistryError(f"{what} is missing") from exc
        return _parse_json(data, what)

    def _tensor_summary(self, mv: ModelVersion) -> dict[str, dict[str, Any]]:
        """Tensor names, dtypes and shapes from the safetensors header, without reading the data."""
        path = _join(self._version_dir(mv.name, mv.version), MODEL_FILE)
        try:
            with self._fs.open_input_file(path) as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size <= _MAX_HEADER_BYTES:
                    raise ValueError(f"implausible header size {size}")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{mv.ref}: {MODEL_FILE} cannot be read ({exc})") from exc
        header.pop("__metadata__", None)
        return {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in sorted(header.items())}

    def _files_in(self, vdir: str) -> list[str]:
        """Every file under a version directory, as a path relative to it (manifest excluded)."""
        infos = self._list(vdir, recursive=True)
        prefix = vdir.rstrip("/") + "/"
        relative = [i.path[len(prefix) :] for i in infos if i.type == pafs.FileType.File]
        return sorted(f for f in relative if f != MANIFEST)

    def _list(self, path: str, *, recursive: bool = False) -> list[Any]:
        selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
        return list(self._fs.get_file_info(selector))

    def _delete_quietly(self, path: str, *, is_dir: bool = True) -> None:
        try:
            info = self._fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                return
            if is_dir:
                self._fs.delete_dir(path)
            else:
                self._fs.delete_file(path)
        except OSError as exc:
            logger.warning("could not remove %s: %s", path, exc)

    def _name_dir(self, name: str) -> str:
        return _join(self._path, name)

    def _version_dir(self, name: str, version: int) -> str:
        return _join(self._path, name, str(version))

    def _uri(self, name: str, version: int) -> str:
        return _join(self._uri_base, name, str(version))


# ---- module helpers ----------------------------------------------------------------------------


def _open_root(root: str, filesystem: pafs.FileSystem | None) -> tuple[Any, str, str]:
    """(filesystem, path inside it, base for version URIs) for a registry root."""
    if filesystem is not None:
        return filesystem, root, root
    if is_uri(root):
        try:
            fs, path = pafs.FileSystem.from_uri(root)
        except (ValueError, OSError) as exc:
            raise RegistryError(f"registry root {root!r} cannot be opened: {exc}") from exc
        return fs, path, root.split("?", 1)[0]
    path = os.path.abspath(os.path.expanduser(root))
    return pafs.LocalFileSystem(), path, path


def _parse_ref(ref: str) -> tuple[str, int | str]:
    """Split a reference into (name, version number | alias | 'latest')."""
    if not isinstance(ref, str) or not ref:
        raise RegistryError(f"malformed model ref {ref!r}: {_REF_FORMS}")
    name, sep, rest = ref, "", ""
    for sep_char in ("@", ":"):
        if sep_char in ref:
            name, sep, rest = ref.partition(sep_char)
            break
    if not _NAME_RE.match(name):
        raise RegistryError(f"malformed model ref {ref!r}: bad name {name!r}; {_REF_FORMS}")
    if sep == "":
        return name, LATEST
    if sep == ":":
        if not _VERSION_RE.match(rest):
            raise RegistryError(
                f"malformed model ref {ref!r}: version {rest!r} is not a positive integer"
            )
        return name, int(rest)
    if not _ALIAS_RE.match(rest):
        raise RegistryError(f"malformed model ref {ref!r}: bad alias {rest!r}; {_REF_FORMS}")
    return name, rest


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def _render_files(
    name: str,
    tensors: dict[str, torch.Tensor],
    documents: dict[str, dict[str, Any]],
    extra_files: dict[str, bytes],
) -> dict[str, bytes]:
    """The bytes of every file of a new version except the manifest, by file name."""
    files = {MODEL_FILE: _tensor_bytes(name, tensors)}
    lineage = documents.get(LINEAGE, {})
    if not isinstance(lineage, dict):
        raise RegistryError(f"cannot register {name}: document {LINEAGE} must be a dict")
    docs = {**documents, LINEAGE: {**lineage}}
    docs[LINEAGE].setdefault("environment", environment())
    for fname, doc in docs.items():
        if not _FILE_RE.match(fname) or not fname.endswith(".json") or fname == MANIFEST:
            raise RegistryError(
                f"cannot register {name}: document name {fname!r} must be a plain file name "
                f"ending in .json (not {MANIFEST})"
            )
        if not isinstance(doc, dict):
            raise RegistryError(f"cannot register {name}: document {fname} must be a dict")
        files[fname] = _dumps(doc, f"cannot register {name}: document {fname}")
    for fname, blob in extra_files.items():
        if not _FILE_RE.match(fname) or fname.endswith(".json") or fname in files:
            raise RegistryError(
                f"cannot register {name}: extra file name {fname!r} must be a plain file name, "
                f"not .json (pass JSON as a document) and not {MODEL_FILE}"
            )
        files[fname] = bytes(blob)
    return files


def _tensor_bytes(name: str, tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise tensors to safetensors bytes (CPU, contiguous, shared memory copied apart)."""
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise RegistryError(
                f"cannot register {name}: tensor {key!r} is a {type(tensor).__name__}, "
                "not a torch.Tensor"
            )
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr and ptr in storages:
            # safetensors refuses tensors that share memory (e.g. tied weights): store a copy.
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        prepared[key] = tensor
    return save_safetensors(prepared)


def _load_tensors(ref: str, blob: bytes | None) -> dict[str, torch.Tensor]:
    if blob is None:
        raise RegistryError(f"{ref}: {MODEL_FILE} is missing")
    try:
        return load_safetensors(blob)
    except SafetensorError as exc:
        raise RegistryError(f"{ref}: {MODEL_FILE} cannot be read ({exc})") from exc


def _verify_version(mv: ModelVersion, manifest: dict[str, Any], data: dict[str, bytes]) -> None:
    """Refuse a version whose files differ in any way from what its manifest recorded."""
    if manifest.get("name") != mv.name or manifest.get("version") != mv.version:
        raise RegistryError(
            f"{mv.ref}: {MANIFEST} describes {manifest.get('name')}:{manifest.get('version')} "
            "(the version directory was copied or renamed by hand)"
        )
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise RegistryError(f"{mv.ref}: {MANIFEST} has no 'files' object")
    unexpected = sorted(set(data) - set(listed))
    if unexpected:
        raise RegistryError(
            f"{mv.ref}: {', '.join(unexpected)} failed verification (not in the manifest: "
            "files were added after registration)"
        )
    missing = sorted(set(listed) - set(data))
    if missing:
        raise RegistryError(
            f"{mv.ref}: {', '.join(missing)} failed verification (in the manifest but missing)"
        )
    for fname in sorted(listed):
        _verify_file(mv.ref, fname, data[fname], listed[fname])


def _verify_file(ref: str, fname: str, data: bytes, entry: dict[str, Any]) -> None:
    if len(data) != entry.get("size"):
        raise RegistryError(
            f"{ref}: {fname} failed verification (size {len(data)}, manifest says "
            f"{entry.get('size')}: the file was modified after registration)"
        )
    if _sha256(data) != entry.get("sha256"):
        raise RegistryError(
            f"{ref}: {fname} failed verification "
            "(sha256 mismatch: the file was modified after registration)"
        )


def _parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RegistryError(f"{what} is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return doc


def _dumps(doc: dict[str, Any], what: str) -> bytes:
    try:
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} cannot be written as JSON ({exc})") from exc


def _listing(items: list[Any], limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
