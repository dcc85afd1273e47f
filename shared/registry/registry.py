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

Reading never follows a symbolic link below root: folders are opened one component at a
time with O_NOFOLLOW relative to their parent's descriptor, and a version folder holding
any link is refused, so a link planted in the registry (to /etc/shadow, to another
model's files) is never read, hashed or served. Root itself may be a link (a mounted
volume): it is what the operator configured. File names listed in a manifest must be
plain names (no separators, no leading dot, so no '..' and no absolute path).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,11}$")
POINTER = "CURRENT"
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
MAX_POINTER_BYTES = 4096  # CURRENT is a few dozen bytes; a huge one is corrupt, not worth reading
MAX_MANIFEST_BYTES = 16 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under a listed name must not hang the reader; it is
# then refused as not a regular file.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class RegistryError(Exception):
    """A registry operation that cannot be done (bad name, unknown version, bad files).

    `reason` is a short stable label for metrics (storefront_registry_errors_total)."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


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


def validate_file_name(fname: str) -> str:
    """A file name from a manifest: one plain component inside the version folder."""
    if (not isinstance(fname, str) or not fname or len(fname) > 255 or fname.startswith(".")
            or any(c in fname for c in "/\\\x00") or fname == MANIFEST):
        raise RegistryError(f"unsafe file name {fname!r} in manifest: file names must be plain names "
                            f"inside the version folder", "unsafe_name")
    return fname


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output: V2 datatype name and shape, -1 for a variable dimension.

    value_range: the inclusive [min, max] every element must lie in, or None (any value of
    the datatype). Declared for index inputs (ids into an embedding table, vocabulary
    codes): a value outside the table makes ONNX Runtime's Gather fail for the whole
    session run, so servers check it before a request can join a batch. In a manifest it
    is the optional "range" field; manifests without it (older ones) read as None.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    value_range: tuple[int | float, int | float] | None = None

    def __post_init__(self) -> None:
        if self.value_range is not None:
            lo, hi = self.value_range
            if not lo <= hi:
                raise ValueError(f"tensor {self.name!r}: range [{lo}, {hi}] is empty")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        if self.value_range is not None:
            d["range"] = list(self.value_range)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), str(d["datatype"]), tuple(int(x) for x in d["shape"]),
                   parse_range(d.get("range"), str(d["name"])))

    def with_range(self, value_range: "tuple[int | float, int | float] | None") -> "TensorSpec":
        return dataclasses.replace(self, value_range=value_range)


def parse_range(value: Any, name: str) -> tuple[int | float, int | float] | None:
    """[min, max] from JSON (integers stay exact Python ints: int64 ids exceed a double's
    53-bit mantissa); None stays None. Anything else is a RegistryError naming the tensor."""
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise RegistryError(f"tensor {name!r}: range must be [min, max] numbers, got {value!r}")
    lo, hi = value
    if not lo <= hi:  # also refuses NaN bounds
        raise RegistryError(f"tensor {name!r}: range [{lo}, {hi}] is empty")
    return lo, hi


def intersect_ranges(*ranges: "tuple[int | float, int | float] | None") -> tuple[int | float, int | float] | None:
    """The tightest range all the declared ones allow (None: none declared). Disjoint
    declarations give an empty range, which the caller must treat as a conflict."""
    declared = [r for r in ranges if r is not None]
    if not declared:
        return None
    return max(r[0] for r in declared), min(r[1] for r in declared)


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

    def input_ranges(self) -> dict[str, tuple[int | float, int | float]]:
        """Declared value ranges of inputs, by name (inputs without one are left out)."""
        return {t.name: t.value_range for t in self.inputs if t.value_range is not None}

    def with_input_ranges(self, ranges: Mapping[str, "tuple[int | float, int | float] | None"]) -> "Signature":
        """This signature with the given input ranges set (names it lacks are ignored)."""
        return dataclasses.replace(self, inputs=tuple(t.with_range(ranges[t.name]) if t.name in ranges else t
                                                      for t in self.inputs))

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

    # ---- link-free access below root ----
    @contextlib.contextmanager
    def _open_dir(self, *parts: str) -> Iterator[int]:
        """A descriptor of root/models/<parts...>, each component opened relative to its parent
        with O_NOFOLLOW, so no link (and no concurrent swap to a link) is followed. FileNotFoundError
        if a component does not exist; RegistryError(reason="symlink") if one is a link."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in ("models", *parts):
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    # A link opened with O_DIRECTORY|O_NOFOLLOW fails with ENOTDIR (or ELOOP).
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise self._not_plain(fd, part, "folder") from e
                    raise
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            os.close(fd)

    def _not_plain(self, dir_fd: int, part: str, kind: str) -> RegistryError:
        try:
            is_link = stat.S_ISLNK(os.lstat(part, dir_fd=dir_fd).st_mode)
        except OSError:
            is_link = False
        if is_link:
            return RegistryError(f"{part!r} in the registry is a symbolic link: refused (links may point "
                                 f"outside the registry)", "symlink")
        return RegistryError(f"{part!r} in the registry is not a plain {kind}", "not_a_file")

    def _open_file(self, dir_fd: int, fname: str) -> int:
        """A descriptor of a regular file in dir_fd; links and special files are refused."""
        try:
            fd = os.open(fname, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise self._not_plain(dir_fd, fname, "file") from e
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._not_plain(dir_fd, fname, "file")
        return fd

    def _read_file(self, dir_fd: int, fname: str, limit: int) -> bytes:
        fd = self._open_file(dir_fd, fname)
        with open(fd, "rb", closefd=True) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise RegistryError(f"{fname} is larger than {limit} bytes", "too_large")
        return data

    def fingerprint(self, name: str, version: str) -> tuple:
        """What a version folder holds now, cheaply: lstat of the folder and of each entry, no
        hashing. A hot reloader compares it with the one taken when it refused the version,
        to retry a version whose files were fixed. Never raises for I/O: an unreadable folder
        has a fingerprint too (so it changing to readable is noticed)."""
        vdir = self.version_dir(name, version)
        try:
            st = os.lstat(vdir)
            top = (st.st_ino, st.st_mode, st.st_mtime_ns)
            if not stat.S_ISDIR(st.st_mode):
                return (top,)
            entries = []
            with os.scandir(vdir) as it:
                for e in it:
                    s = e.stat(follow_symlinks=False)
                    entries.append((e.name, s.st_ino, s.st_mode, s.st_size, s.st_mtime_ns))
            return (top, tuple(sorted(entries)))
        except OSError as e:
            return (("unreadable", e.errno),)

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
        """The version CURRENT points at, or None before the first publish.

        RegistryError when it cannot be read: reason "pointer_corrupt" (not a valid pointer),
        "symlink" (it or its folder is a link), "pointer_unreadable" (any other I/O error)."""
        validate_name(name)
        try:
            with self._open_dir(name) as mfd:
                raw = self._read_file(mfd, POINTER, MAX_POINTER_BYTES)
        except FileNotFoundError:
            return None
        except RegistryError as e:
            reason = "pointer_corrupt" if e.reason == "too_large" else e.reason
            raise RegistryError(f"corrupt pointer {self.pointer_path(name)}: {e}", reason) from e
        except OSError as e:
            raise RegistryError(f"unreadable pointer {self.pointer_path(name)}: {e}", "pointer_unreadable") from e
        try:
            return validate_version(json.loads(raw)["version"])
        except (ValueError, KeyError, TypeError, RegistryError) as e:
            raise RegistryError(f"corrupt pointer {self.pointer_path(name)}: {e}", "pointer_corrupt") from e

    def manifest(self, name: str, version: str) -> Manifest:
        self.version_dir(name, version)  # validates both before they touch a path
        try:
            with self._open_dir(name, version) as vfd:
                return self._manifest_at(vfd, name, version)
        except FileNotFoundError:
            raise RegistryError(f"model {name!r} has no version {version!r}", "missing") from None
        except NotADirectoryError:
            raise RegistryError(f"model {name!r} has no version {version!r}", "missing") from None
        except RegistryError as e:
            raise RegistryError(f"{name}/{version}: {e}", e.reason) from e

    def _manifest_at(self, vfd: int, name: str, version: str) -> Manifest:
        try:
            data = json.loads(self._read_file(vfd, MANIFEST, MAX_MANIFEST_BYTES))
        except ValueError as e:
            raise RegistryError(f"manifest is not JSON: {e}", "malformed") from e
        manifest = Manifest.from_json(data)
        if manifest.name != name or manifest.version != version:
            raise RegistryError(f"manifest names {manifest.name}/{manifest.version}", "malformed")
        return manifest

    def verify(self, name: str, version: str) -> Manifest:
        """The manifest, after checking every listed file's sha256; RegistryError otherwise.

        Also refused: a version folder (or the model folder) that is a link, a version folder
        holding any link (services read files from the folder by name, listed or not), and
        manifest file names that are not plain names."""
        self.version_dir(name, version)
        try:
            with self._open_dir(name, version) as vfd:
                manifest = self._manifest_at(vfd, name, version)
                with os.scandir(vfd) as it:
                    links = sorted(e.name for e in it if e.is_symlink())
                if links:
                    raise RegistryError(f"holds symbolic links {links[:5]}: refused (links may point outside "
                                        f"the registry)", "symlink")
                if MODEL_FILE not in manifest.files:
                    raise RegistryError(f"manifest lists no {MODEL_FILE}", "malformed")
                for fname, expected in manifest.files.items():
                    validate_file_name(fname)
                    try:
                        fd = self._open_file(vfd, fname)
                    except FileNotFoundError:
                        raise RegistryError(f"file {fname!r} is missing", "missing") from None
                    with open(fd, "rb", closefd=True) as f:
                        actual = hashlib.file_digest(f, "sha256").hexdigest()
                    if actual != expected:
                        raise RegistryError(f"checksum mismatch for {fname} (manifest {expected[:12]}, "
                                            f"file {actual[:12]})", "checksum")
        except (FileNotFoundError, NotADirectoryError):
            raise RegistryError(f"model {name!r} has no version {version!r}", "missing") from None
        except RegistryError as e:
            raise RegistryError(f"{name}/{version}: {e}", e.reason) from e
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
                validate_file_name(fname)  # what verify would refuse is never published
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
