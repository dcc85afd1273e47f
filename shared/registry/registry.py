"""A model registry on a plain folder (a shared volume when services run on several hosts).

Layout::

    <root>/models/<name>/<version>/model.onnx     the files of one version
    <root>/models/<name>/<version>/manifest.json  what they are (see Manifest)
    <root>/models/<name>/CURRENT                  {"version": "..."}: the one to serve

Publishing writes a complete version folder under a temporary name, fsyncs it, renames
it into place (rename is atomic and fails if the version exists, so two publishers never
share a version), and only then flips CURRENT with an atomic replace. A watcher therefore
never sees a half-written version. Versions are positive integers, allocated in order.
Names and versions are validated before they touch a path, so nothing can escape root.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,11}$")
POINTER = "CURRENT"
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"


class RegistryError(Exception):
    """A registry operation that cannot be done (bad name, unknown version, bad files)."""


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(
            f"invalid model name {name!r}: use 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    return name


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise RegistryError(f"invalid model version {version!r}: versions are positive integers")
    return version


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output: V2 datatype name and shape, -1 for a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), str(d["datatype"]), tuple(int(x) for x in d["shape"]))


@dataclasses.dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Signature":
        return cls(
            tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            tuple(TensorSpec.from_json(t) for t in d["outputs"]),
        )

    def differences(self, other: "Signature") -> list[str]:
        """Human-readable differences between this (expected) signature and other (found)."""
        out = []
        for kind, mine, theirs in (("input", self.inputs, other.inputs), ("output", self.outputs, other.outputs)):
            a = {t.name: t for t in mine}
            b = {t.name: t for t in theirs}
            for name in sorted(a.keys() - b.keys()):
                out.append(f"{kind} {name!r} is missing")
            for name in sorted(b.keys() - a.keys()):
                out.append(f"unexpected {kind} {name!r}")
            for name in sorted(a.keys() & b.keys()):
                if a[name].datatype != b[name].datatype:
                    out.append(f"{kind} {name!r} has datatype {b[name].datatype}, expected {a[name].datatype}")
                if not _shapes_compatible(a[name].shape, b[name].shape):
                    out.append(f"{kind} {name!r} has shape {list(b[name].shape)}, expected {list(a[name].shape)}")
        return out


def _shapes_compatible(expected: tuple[int, ...], found: tuple[int, ...]) -> bool:
    if len(expected) != len(found):
        return False
    return all(e == f or e == -1 and f == -1 for e, f in zip(expected, found))


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What one version is: enough to verify its files and to know where it came from."""

    name: str
    version: str
    created: str
    parent: str | None
    signature: Signature
    files: dict[str, str]  # file name -> sha256
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    learned_up_to: int | None = None  # event-log offset the model has learned up to
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # domain data (thresholds, feature names)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "parent": self.parent,
            "signature": self.signature.to_json(),
            "files": dict(self.files),
            "metrics": dict(self.metrics),
            "learned_up_to": self.learned_up_to,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Manifest":
        try:
            return cls(
                name=validate_name(d["name"]),
                version=validate_version(d["version"]),
                created=str(d["created"]),
                parent=d.get("parent"),
                signature=Signature.from_json(d["signature"]),
                files={str(k): str(v) for k, v in d["files"].items()},
                metrics=dict(d.get("metrics") or {}),
                learned_up_to=d.get("learned_up_to"),
                extra=dict(d.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RegistryError(f"malformed manifest: {e!r}") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ModelRegistry:
    """Publish, list, read and roll back model versions under one root folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.models_dir = self.root / "models"

    # ---- paths (every one goes through validation) ----
    def model_dir(self, name: str) -> Path:
        return self.models_dir / validate_name(name)

    def version_dir(self, name: str, version: str) -> Path:
        return self.model_dir(name) / validate_version(version)

    def pointer_path(self, name: str) -> Path:
        return self.model_dir(name) / POINTER

    # ---- reading ----
    def models(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def versions(self, name: str) -> list[str]:
        d = self.model_dir(name)
        if not d.is_dir():
            return []
        found = [p.name for p in d.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(found, key=int)

    def current_version(self, name: str) -> str | None:
        """The version CURRENT points at, or None before the first publish."""
        try:
            raw = self.pointer_path(name).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return validate_version(json.loads(raw)["version"])
        except (ValueError, KeyError, TypeError, RegistryError) as e:
            raise RegistryError(f"corrupt pointer {self.pointer_path(name)}: {e}") from e

    def manifest(self, name: str, version: str) -> Manifest:
        path = self.version_dir(name, version) / MANIFEST
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise RegistryError(f"model {name!r} has no version {version!r}") from None
        except ValueError as e:
            raise RegistryError(f"manifest of {name}/{version} is not JSON: {e}") from e
        manifest = Manifest.from_json(data)
        if manifest.name != name or manifest.version != version:
            raise RegistryError(f"manifest of {name}/{version} names {manifest.name}/{manifest.version}")
        return manifest

    def verify(self, name: str, version: str) -> Manifest:
        """The manifest, after checking every listed file's sha256; RegistryError otherwise."""
        manifest = self.manifest(name, version)
        vdir = self.version_dir(name, version)
        if MODEL_FILE not in manifest.files:
            raise RegistryError(f"{name}/{version}: manifest lists no {MODEL_FILE}")
        for fname, expected in manifest.files.items():
            path = vdir / fname
            if "/" in fname or fname.startswith(".") or not path.is_file():
                raise RegistryError(f"{name}/{version}: file {fname!r} is missing or not a plain file")
            actual = sha256_file(path)
            if actual != expected:
                raise RegistryError(f"{name}/{version}: checksum mismatch for {fname} (manifest {expected[:12]}, file {actual[:12]})")
        return manifest

    def model_path(self, name: str, version: str) -> Path:
        return self.version_dir(name, version) / MODEL_FILE

    # ---- writing ----
    def publish(
        self,
        name: str,
        model_file: str | os.PathLike[str],
        signature: Signature,
        *,
        metrics: Mapping[str, Any] | None = None,
        learned_up_to: int | None = None,
        extra: Mapping[str, Any] | None = None,
        extra_files: Iterable[str | os.PathLike[str]] = (),
        parent: str | None = None,
        make_current: bool = True,
    ) -> Manifest:
        """Write a new version (model file plus any extra files), then flip CURRENT to it."""
        mdir = self.model_dir(name)
        mdir.mkdir(parents=True, exist_ok=True)
        if parent is None:
            parent = self.current_version(name)
        staging = mdir / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            files: dict[str, str] = {}
            sources = [(Path(model_file), MODEL_FILE)] + [(Path(p), Path(p).name) for p in extra_files]
            for src, fname in sources:
                if fname in files or fname == MANIFEST:
                    raise RegistryError(f"duplicate or reserved file name {fname!r}")
                dst = staging / fname
                shutil.copyfile(src, dst)
                with open(dst, "rb+") as f:
                    os.fsync(f.fileno())
                files[fname] = sha256_file(dst)
            version = self._install(name, staging, signature, files, parent, metrics, learned_up_to, extra)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        if make_current:
            self.set_current(name, version)
        return self.manifest(name, version)

    def _install(self, name, staging, signature, files, parent, metrics, learned_up_to, extra) -> str:
        mdir = self.model_dir(name)
        existing = self.versions(name)
        candidate = int(existing[-1]) + 1 if existing else 1
        while True:
            version = str(candidate)
            manifest = Manifest(
                name=name,
                version=version,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                parent=parent,
                signature=signature,
                files=files,
                metrics=dict(metrics or {}),
                learned_up_to=learned_up_to,
                extra=dict(extra or {}),
            )
            _write_atomic(staging / MANIFEST, json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode())
            _fsync_dir(staging)
            try:
                os.rename(staging, mdir / version)
            except OSError as e:
                # Another publisher took this number first: take the next one.
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    candidate += 1
                    continue
                raise
            _fsync_dir(mdir)
            return version

    def set_current(self, name: str, version: str) -> None:
        """Atomically point CURRENT at an existing version (used by publish and rollback)."""
        self.manifest(name, version)  # must exist and be readable
        payload = {"version": version, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_atomic(self.pointer_path(name), json.dumps(payload).encode())

    def rollback(self, name: str, to_version: str | None = None) -> str:
        """Point CURRENT back: to to_version, or to the current version's parent."""
        current = self.current_version(name)
        if to_version is None:
            if current is None:
                raise RegistryError(f"model {name!r} has no current version to roll back from")
            to_version = self.manifest(name, current).parent
            if to_version is None:
                raise RegistryError(f"{name}/{current} has no parent to roll back to")
        self.verify(name, to_version)
        self.set_current(name, to_version)
        return to_version
