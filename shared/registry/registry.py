"""A model registry on a plain folder (a shared volume when services run on several hosts).
Long file: one class, ModelRegistry, whose verbs share the link-free descriptor walk and the
per-model lock; what stands apart is in manifest.py (the version format), canary.py (the CANARY
pointer) and files.py (crash-safe file operations).

Layout::

    <root>/models/<name>/<version>/model.onnx     the files of one version
    <root>/models/<name>/<version>/manifest.json  what they are (see Manifest)
    <root>/models/<name>/CURRENT                  {"version": "..."}: the one to serve
    <root>/models/<name>/CANARY                   {"version", "mode", "share", "started", ...}: a candidate
                                                  meeting live traffic beside CURRENT (absent: none)
    <root>/models/<name>/PINNED                   {"pins": {"<version>": {...}}}: never collected
    <root>/models/<name>/.serving/<instance>      lease: the versions one serving process holds
    <root>/models/.locks/<name>                   flock taken by gc, pin/unpin, set_current and the canary verbs

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

Canary (`start_canary`, `promote`, `abort_canary`): a version that passed the trainer's gate
first meets live traffic beside the champion. CANARY names it with a mode: "canary" (a
deterministic `share` of request keys is answered by it) or "shadow" (it scores every request,
answers none). `promote` flips CURRENT to it and removes CANARY; `abort_canary` removes CANARY
(the rollback: CURRENT never moved). All three take the model's lock, as CURRENT flips do, so a
promote and an abort (or gc) never interleave. A promote writes CURRENT before it removes
CANARY: a crash in between leaves a CANARY naming CURRENT, which every reader treats as no
canary. Registries written before canaries existed have no CANARY file: no canary.

Names starting with '.' are never versions or models (the name patterns refuse them), so
every reader ignores what lives there: staging folders of publishes in progress, `.trash-*`
folders of versions being deleted, the lease folder.

Garbage collection (`gc`) removes old versions while keeping every version anything may
still need: CURRENT and its rollback target (the parent `rollback()` goes to), any version
named by another pointer file (an upper-case name such as a future CANARY: a pointer gc
does not know yet is honored, not ignored), pinned versions, versions named by a fresh
lease, the last N and those younger than a minimum age. It decides and renames the doomed
folders to `.trash-*` (atomic, invisible to readers) under a per-model lock, and deletes
them after releasing it, so a crash leaves only trash the next gc removes. When it cannot
read what it must keep (CURRENT, a pointer, PINNED, a fresh lease) it deletes nothing.
"""
from __future__ import annotations

import calendar
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from shared import metrics
from shared.registry.canary import CANARY, CanaryState, check_canary
from shared.registry.files import fsync_dir, remove_tree, tree_bytes, write_atomic
from shared.registry.manifest import (CREATED_FORMAT, MANIFEST, NAME_RE, VERSION_RE, Manifest, RegistryError, Signature,
                                      sha256_file, validate_file_name, validate_name, validate_version)

POINTER = "CURRENT"
MODEL_FILE = "model.onnx"
MAX_POINTER_BYTES = 4096  # CURRENT is a few dozen bytes; a huge one is corrupt, not worth reading
MAX_MANIFEST_BYTES = 16 << 20
PINNED = "PINNED"
LEASES_DIR = ".serving"
LOCKS_DIR = ".locks"
TRASH_PREFIX = ".trash-"
STAGING_PREFIX = ".staging-"
# Pointer files are upper-case names in the model folder holding JSON that names versions
# (CURRENT today; a canary or shadow pointer tomorrow). gc keeps every version any of them names.
POINTER_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")
INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_SMALL_FILE_BYTES = 1 << 20  # PINNED, leases and other pointers are small; larger ones are corrupt

# gc defaults (the trainer's settings and the CLI start from these)
GC_KEEP_LAST = 10
# A version this young is kept. Serving processes lease what they hold and what they are
# about to load, so this only covers the moment between a replica reading CURRENT and
# writing its lease, and readers that take no lease (scripts, benches). It bounds disk too:
# at a version every few seconds, 10 minutes would keep hundreds of versions.
GC_MIN_AGE_S = 120.0
GC_ROLLBACK_DEPTH = 1  # parents of CURRENT kept: what `rollback` (and `rollback` again) goes back to
LEASE_TTL_S = 300.0  # a lease not refreshed for this long is from a dead process and is ignored
LEASE_PRUNE_FACTOR = 10  # ... and deleted once it is this many TTLs old (the folder stays bounded)
STAGING_MAX_AGE_S = 3600.0  # a staging folder this old is from a crashed publish
LOCK_TIMEOUT_S = 30.0

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under a listed name must not hang the reader; it is
# then refused as not a regular file.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _versions_in(value: Any) -> set[str]:
    """Every string in a JSON value that is a version number: what a pointer file names,
    whatever its schema (a future pointer's fields are unknown here; keeping a version too
    many is harmless, deleting one a pointer names is not)."""
    if isinstance(value, str):
        return {value} if VERSION_RE.match(value) else set()
    if isinstance(value, Mapping):
        return set().union(*(_versions_in(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_versions_in(v) for v in value)) if value else set()
    return set()


def _parse_created(created: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(created, CREATED_FORMAT)))
    except (TypeError, ValueError):
        return None


def default_instance() -> str:
    """A lease name unique to this process: host, pid and a random part (pids are reused)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64].strip(".-") or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclasses.dataclass(frozen=True)
class Lease:
    """What one serving process holds of a model: {"serving": v, "previous": v, "loading": v}."""

    instance: str
    versions: dict[str, str]
    updated: float  # the writer's wall clock (registry clock), seconds since the epoch
    fresh: bool



@dataclasses.dataclass
class GcReport:
    """What one gc kept (version -> why), removed, and the bytes involved."""

    name: str
    dry_run: bool
    kept: dict[str, list[str]]
    removed: list[str]
    bytes_freed: int  # of the removed versions (dry run: what removing them would free)
    bytes_after: int  # of the whole model folder once gc is done (dry run: as it is)
    leftovers: list[str] = dataclasses.field(default_factory=list)  # trash/staging of crashed runs removed
    leases: list[Lease] = dataclasses.field(default_factory=list)
    pruned_leases: list[str] = dataclasses.field(default_factory=list)


class ModelRegistry:
    """Publish, list, read and roll back model versions under one root folder."""

    def __init__(self, root: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.models_dir = self.root / "models"
        # Wall clock (seconds since the epoch) for manifests' created, leases and gc ages;
        # injectable so tests move time without sleeping.
        self.clock = clock

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
                nfd = self._open_subdir(fd, part)
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            os.close(fd)

    def _open_subdir(self, dir_fd: int, part: str) -> int:
        """A descriptor of folder `part` in dir_fd, never through a link (RegistryError)."""
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            # A link opened with O_DIRECTORY|O_NOFOLLOW fails with ENOTDIR (or ELOOP).
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise self._not_plain(dir_fd, part, "folder") from e
            raise

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
                created=time.strftime(CREATED_FORMAT, time.gmtime(self.clock())),
                parent=parent,
                signature=signature,
                files=files,
                metrics=dict(metrics or {}),
                learned_up_to=learned_up_to,
                extra=dict(extra or {}),
            )
            write_atomic(staging / MANIFEST, json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode())
            fsync_dir(staging)
            try:
                os.rename(staging, mdir / version)
            except OSError as e:
                # Another publisher took this number first: take the next one.
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    candidate += 1
                    continue
                raise
            fsync_dir(mdir)
            return version

    def set_current(self, name: str, version: str) -> None:
        """Atomically point CURRENT at an existing version (used by publish and rollback).

        Under the model's gc lock: a gc either ran before (then the version is checked to still
        exist, here) or runs after (then it sees CURRENT naming it and keeps it), so CURRENT
        never ends up naming a version gc deleted meanwhile (e.g. `rollback --to` an old one)."""
        with self._model_lock(name, LOCK_TIMEOUT_S):
            self._set_current_locked(name, version)

    def _set_current_locked(self, name: str, version: str) -> None:
        self.manifest(name, version)  # must exist and be readable
        payload = {"version": version, "updated": time.strftime(CREATED_FORMAT, time.gmtime(self.clock()))}
        write_atomic(self.pointer_path(name), json.dumps(payload).encode())

    # ---- canary: a candidate meeting live traffic beside CURRENT ----
    def canary(self, name: str) -> CanaryState | None:
        """The running canary, or None (no CANARY file, or one naming CURRENT: a promote that
        crashed between its two writes). RegistryError when CANARY cannot be read."""
        validate_name(name)
        try:
            with self._open_dir(name) as mfd:
                state = CanaryState.from_json(self._read_json_at(mfd, CANARY))
        except FileNotFoundError:
            return None
        except RegistryError as e:
            reason = "pointer_corrupt" if e.reason in ("too_large", "malformed", "invalid") else e.reason
            raise RegistryError(f"{name}/{CANARY}: {e}", reason) from e
        except OSError as e:
            raise RegistryError(f"{name}/{CANARY} is unreadable: {e}", "pointer_unreadable") from e
        if state.version == self.current_version(name):
            return None
        return state

    def start_canary(self, name: str, version: str, mode: str = "canary", share: float = 0.1, *,
                     replace: bool = False, note: str = "") -> CanaryState:
        """Start version as the canary of name (CURRENT does not move). One canary at a time:
        RegistryError(reason="canary_running") when another runs, unless replace (the running
        one is then aborted by this very write). The version must verify (checksums) and differ
        from CURRENT; shadow mode ignores share (every request is scored: recorded as 1)."""
        validate_version(version)
        check_canary(mode, share)
        with self._model_lock(name, LOCK_TIMEOUT_S):
            self.verify(name, version)
            current = self.current_version(name)
            if current is None:
                raise RegistryError(f"model {name!r} has no CURRENT version: publish one before a canary",
                                    "no_current")
            if current == version:
                raise RegistryError(f"{name}/{version} is already CURRENT", "invalid")
            running = self.canary(name)
            if running is not None and running.version != version and not replace:
                raise RegistryError(f"{name}: canary {running.version} is running (promote or abort it first)",
                                    "canary_running")
            state = CanaryState(version, mode, 1.0 if mode == "shadow" else float(share), self.clock(), current, note)
            with self._open_dir(name) as mfd:
                self._write_json_at(mfd, CANARY, state.to_json())
        return state

    def promote(self, name: str, version: str | None = None) -> str:
        """CURRENT := the canary's version, then clear CANARY. version, when given, must be the
        running canary (a decision taken on one canary never promotes its successor).
        RegistryError(reason="no_canary") when none runs (or another one does)."""
        with self._model_lock(name, LOCK_TIMEOUT_S):
            state = self._running(name, version)
            self.verify(name, state.version)  # what becomes CURRENT must be whole
            self._set_current_locked(name, state.version)
            self._clear_canary_locked(name)
        return state.version

    def abort_canary(self, name: str, version: str | None = None) -> str:
        """Clear CANARY (the rollback: CURRENT never moved; services drop the candidate on their
        next poll). Returns the aborted version; RegistryError(reason="no_canary") when none runs
        (or, with version, when another one does)."""
        with self._model_lock(name, LOCK_TIMEOUT_S):
            state = self._running(name, version)
            self._clear_canary_locked(name)
        return state.version

    def _running(self, name: str, version: str | None) -> CanaryState:
        state = self.canary(name)
        if state is None:
            raise RegistryError(f"model {name!r} has no running canary", "no_canary")
        if version is not None and validate_version(version) != state.version:
            raise RegistryError(f"{name}: the running canary is {state.version}, not {version}", "no_canary")
        return state

    def _clear_canary_locked(self, name: str) -> None:
        with self._open_dir(name) as mfd:
            try:
                os.unlink(CANARY, dir_fd=mfd)  # unlink never follows a link: it removes the name
            except FileNotFoundError:
                return
            os.fsync(mfd)

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

    # ---- locking ----
    @contextlib.contextmanager
    def _model_lock(self, name: str, timeout_s: float) -> Iterator[None]:
        """An exclusive flock on models/.locks/<name>, serializing gc, pin/unpin and set_current
        across threads and processes (each call opens its own descriptor, and flock locks
        belong to the open file). The lock file lives outside the model folder so that the
        model folder holds only versions, pointers and leases. RegistryError(reason="busy")
        after timeout_s; the lock goes with the descriptor, so a crashed holder frees it."""
        validate_name(name)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with self._open_dir() as models_fd:
            with contextlib.suppress(FileExistsError):
                os.mkdir(LOCKS_DIR, 0o755, dir_fd=models_fd)
            locks_fd = self._open_subdir(models_fd, LOCKS_DIR)
        try:
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644,
                             dir_fd=locks_fd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise self._not_plain(locks_fd, name, "file") from e
                raise
        finally:
            os.close(locks_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RegistryError(f"lock of {name!r} is not a plain file", "not_a_file")
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise RegistryError(f"model {name!r} is locked by another registry operation (gc, pin, "
                                            f"publish) for more than {timeout_s:g} s", "busy") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read_json_at(self, dir_fd: int, fname: str) -> Any:
        """JSON of a small plain file in dir_fd (no link followed). FileNotFoundError if absent;
        RegistryError (reason of the read, or "malformed") otherwise."""
        raw = self._read_file(dir_fd, fname, MAX_SMALL_FILE_BYTES)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RegistryError(f"{fname} is not JSON: {e}", "malformed") from e

    def _write_json_at(self, dir_fd: int, fname: str, value: Any, durable: bool = True) -> None:
        """Replace fname in dir_fd atomically (temporary dot-name, then rename), never through a
        link: the temporary file is created with O_EXCL|O_NOFOLLOW and rename replaces a link
        rather than following it."""
        tmp = f".{fname}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        try:
            with open(fd, "wb", closefd=True) as f:
                f.write(json.dumps(value, indent=1, sort_keys=True).encode())
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, fname, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        if durable:
            os.fsync(dir_fd)

    # ---- pins ----
    def pins(self, name: str) -> dict[str, dict[str, Any]]:
        """Pinned versions: version -> {"note", "pinned"}. Empty when nothing is pinned.
        RegistryError(reason="pins_corrupt") when PINNED cannot be read: gc then deletes nothing."""
        validate_name(name)
        try:
            with self._open_dir(name) as mfd:
                data = self._read_json_at(mfd, PINNED)
        except FileNotFoundError:
            return {}
        except (RegistryError, OSError) as e:
            raise RegistryError(f"cannot read {name}/{PINNED}: {e}", "pins_corrupt") from e
        pins = data.get("pins") if isinstance(data, dict) else None
        if not isinstance(pins, dict) or not all(isinstance(v, str) and VERSION_RE.match(v) for v in pins):
            raise RegistryError(f"{name}/{PINNED} is malformed: expected {{\"pins\": {{version: {{...}}}}}}",
                                "pins_corrupt")
        return {v: dict(info) if isinstance(info, dict) else {} for v, info in pins.items()}

    def pin(self, name: str, version: str, note: str = "") -> None:
        """Keep version out of gc until unpinned (e.g. a known-good fallback, an audited model)."""
        validate_version(version)
        with self._model_lock(name, LOCK_TIMEOUT_S):
            self.manifest(name, version)  # only an existing, readable version is pinned
            pins = self.pins(name)
            pins[version] = {"note": note, "pinned": time.strftime(CREATED_FORMAT, time.gmtime(self.clock()))}
            with self._open_dir(name) as mfd:
                self._write_json_at(mfd, PINNED, {"pins": pins})

    def unpin(self, name: str, version: str) -> bool:
        """Let gc collect version again. False when it was not pinned."""
        validate_version(version)
        with self._model_lock(name, LOCK_TIMEOUT_S):
            pins = self.pins(name)
            if pins.pop(version, None) is None:
                return False
            with self._open_dir(name) as mfd:
                self._write_json_at(mfd, PINNED, {"pins": pins})
            return True

    # ---- leases: what serving processes hold ----
    def write_lease(self, name: str, instance: str, versions: Mapping[str, str | None]) -> None:
        """Write (or refresh) <model>/.serving/<instance>: the versions this process serves, keeps
        loaded for rollback, or is loading. Not fsynced: a crash that loses it also ended the
        process that held the versions. Never through a link below root."""
        if not INSTANCE_RE.match(instance):
            raise RegistryError(f"invalid lease instance name {instance!r}")
        named = {k: validate_version(v) for k, v in versions.items() if v is not None}
        payload = {"instance": instance, "host": socket.gethostname(), "pid": os.getpid(),
                   "updated": self.clock(), "versions": named}
        with self._open_dir(name) as mfd:
            with contextlib.suppress(FileExistsError):
                os.mkdir(LEASES_DIR, 0o755, dir_fd=mfd)
        with self._open_dir(name, LEASES_DIR) as lfd:
            self._write_json_at(lfd, instance, payload, durable=False)

    def remove_lease(self, name: str, instance: str) -> None:
        """Drop this process's lease (clean shutdown); absent is fine."""
        if not INSTANCE_RE.match(instance):
            raise RegistryError(f"invalid lease instance name {instance!r}")
        try:
            with self._open_dir(name, LEASES_DIR) as lfd:
                os.unlink(instance, dir_fd=lfd)
        except FileNotFoundError:
            pass

    def leases(self, name: str, ttl_s: float = LEASE_TTL_S, now: float | None = None) -> list[Lease]:
        """Every lease of the model, fresh or stale (refreshed more than ttl_s ago).

        RegistryError(reason="lease_unreadable") for a lease that cannot be read while its file
        is recent (by mtime): it may name a version a live process holds, so gc must not guess."""
        validate_name(name)
        now = self.clock() if now is None else now
        out: list[Lease] = []
        try:
            with self._open_dir(name, LEASES_DIR) as lfd:
                with os.scandir(lfd) as it:
                    entries = sorted(e.name for e in it if not e.name.startswith("."))
                for fname in entries:
                    try:
                        data = self._read_json_at(lfd, fname)
                        if not INSTANCE_RE.match(fname) or not isinstance(data, dict):
                            raise RegistryError("not a lease object", "malformed")
                        updated = float(data["updated"])
                        versions = {str(k): validate_version(v) for k, v in dict(data["versions"]).items()}
                    except FileNotFoundError:
                        continue  # its process removed it meanwhile
                    except (RegistryError, OSError, KeyError, TypeError, ValueError) as e:
                        try:
                            age = time.time() - os.lstat(fname, dir_fd=lfd).st_mtime
                        except OSError:
                            continue
                        if age <= ttl_s:
                            raise RegistryError(f"lease {name}/{LEASES_DIR}/{fname} is unreadable ({e}) and "
                                                f"recent: cannot tell which versions it holds",
                                                "lease_unreadable") from e
                        out.append(Lease(fname, {}, now - age, False))  # stale garbage: prunable
                        continue
                    # A lease from the future (clock skew between hosts) counts as fresh.
                    out.append(Lease(fname, versions, updated, now - updated <= ttl_s))
        except FileNotFoundError:
            return []
        return out

    # ---- garbage collection ----
    def gc(self, name: str, keep_last: int = GC_KEEP_LAST, *, min_age_s: float = GC_MIN_AGE_S,
           rollback_depth: int = GC_ROLLBACK_DEPTH, lease_ttl_s: float = LEASE_TTL_S, dry_run: bool = False,
           now: float | None = None, lock_timeout_s: float = LOCK_TIMEOUT_S) -> GcReport:
        """Delete the versions of `name` nothing needs any more; see the module doc for what is kept.

        keep_last >= 1: the newest version is always kept (a publish between installing its
        folder and flipping CURRENT must not lose it). Raises RegistryError, having deleted
        nothing, when what must be kept cannot be established (no or unreadable CURRENT, an
        unreadable pointer, PINNED or recent lease) or the lock stays busy (reason "busy").
        Safe to run from several processes at once: decisions and renames happen under the
        model's lock, and every step tolerates a version already gone."""
        validate_name(name)
        if keep_last < 1 or min_age_s < 0 or rollback_depth < 0 or lease_ttl_s <= 0:
            raise RegistryError("gc needs keep_last >= 1, min_age_s >= 0, rollback_depth >= 0, lease_ttl_s > 0")
        if not self.model_dir(name).is_dir():
            raise RegistryError(f"model {name!r} does not exist", "missing")
        try:
            report = self._gc(name, keep_last, min_age_s, rollback_depth, lease_ttl_s, dry_run, now, lock_timeout_s)
        except (RegistryError, OSError) as e:
            metrics.REGISTRY_GC.labels(name, getattr(e, "reason", "io_error")).inc()
            raise
        metrics.REGISTRY_GC.labels(name, "ok").inc()
        metrics.REGISTRY_BYTES.labels(name).set(report.bytes_after)
        if report.removed and not dry_run:
            metrics.REGISTRY_VERSIONS_REMOVED.labels(name).inc(len(report.removed))
        return report

    def _gc(self, name, keep_last, min_age_s, rollback_depth, lease_ttl_s, dry_run, now, lock_timeout_s) -> GcReport:
        mdir = self.model_dir(name)
        trash: list[tuple[str, Path]] = []
        leftovers: list[Path] = []
        pruned: list[str] = []
        with self._model_lock(name, lock_timeout_s):
            now = self.clock() if now is None else now
            keep, leases = self._keep_set(name, keep_last, min_age_s, rollback_depth, lease_ttl_s, now)
            doomed = [v for v in self.versions(name) if v not in keep]
            with self._open_dir(name) as mfd:
                with os.scandir(mfd) as it:
                    names = [e.name for e in it]
                for entry in names:
                    # Leftovers of crashed runs: trash of a gc that died before deleting it, staging of a
                    # publish that died (old enough that no publish can still be writing it: mtime is the
                    # file system's clock, so it is compared with time.time(), not the injected clock).
                    if entry.startswith(TRASH_PREFIX):
                        leftovers.append(mdir / entry)
                    elif entry.startswith(STAGING_PREFIX):
                        with contextlib.suppress(OSError):
                            if time.time() - os.lstat(entry, dir_fd=mfd).st_mtime > STAGING_MAX_AGE_S:
                                leftovers.append(mdir / entry)
                if not dry_run:
                    for version in doomed:
                        # Renamed first, deleted later: the rename is atomic, so a reader sees the version
                        # whole or not at all, and a crash mid-delete leaves a .trash folder, not half a version.
                        to = f"{TRASH_PREFIX}{version}-{uuid.uuid4().hex[:12]}"
                        try:
                            os.rename(version, to, src_dir_fd=mfd, dst_dir_fd=mfd)
                        except FileNotFoundError:
                            continue  # another gc (on a volume without working locks) took it
                        trash.append((version, mdir / to))
                    if trash:
                        os.fsync(mfd)
                    for lease in leases:
                        if not lease.fresh and now - lease.updated > lease_ttl_s * LEASE_PRUNE_FACTOR:
                            with contextlib.suppress(OSError):
                                with self._open_dir(name, LEASES_DIR) as lfd:
                                    os.unlink(lease.instance, dir_fd=lfd)
                                pruned.append(lease.instance)
        # Outside the lock: deleting tens of MB must not hold up a publish waiting to flip CURRENT.
        if dry_run:
            freed = sum(tree_bytes(mdir / v) for v in doomed)
            removed = doomed
        else:
            freed = 0
            for _, path in trash:
                freed += tree_bytes(path)
                remove_tree(path)
            for path in leftovers:
                remove_tree(path)
            removed = [v for v, _ in trash]
        return GcReport(name=name, dry_run=dry_run, kept=keep, removed=removed, bytes_freed=freed,
                        bytes_after=tree_bytes(mdir), leftovers=[p.name for p in leftovers], leases=leases,
                        pruned_leases=pruned)

    def _keep_set(self, name: str, keep_last: int, min_age_s: float, rollback_depth: int, lease_ttl_s: float,
                  now: float) -> tuple[dict[str, list[str]], list[Lease]]:
        """version -> reasons to keep it, for every version that has one; and the leases read."""
        versions = self.versions(name)
        keep: dict[str, list[str]] = {}

        def hold(version: str | None, why: str) -> None:
            if version is not None and version in versions:
                keep.setdefault(version, []).append(why)

        current = self.current_version(name)  # RegistryError when unreadable: nothing is deleted
        if current is None:
            raise RegistryError(f"model {name!r} has no CURRENT version: gc deletes nothing without knowing "
                                f"the champion", "no_current")
        if current not in versions:
            raise RegistryError(f"{name}/CURRENT names version {current}, which does not exist: gc deletes "
                                f"nothing until the pointer is repaired", "missing")
        hold(current, "champion (CURRENT)")
        # The rollback chain: `rollback` goes to CURRENT's parent, a second one to its parent.
        # CURRENT's manifest must read (else its rollback target is unknown); deeper links stop
        # at the first unreadable one, which is itself kept.
        version = current
        for _ in range(rollback_depth):
            try:
                parent = self.manifest(name, version).parent
            except RegistryError:
                if version == current:
                    raise
                break
            if parent is None or not VERSION_RE.match(str(parent)):
                break
            hold(parent, f"rollback target of {version}")
            version = parent
        # Every other pointer file (a canary, a shadow...): whatever versions it names.
        with self._open_dir(name) as mfd:
            with os.scandir(mfd) as it:
                pointers = sorted(e.name for e in it
                                  if POINTER_NAME_RE.match(e.name) and e.name not in (POINTER, PINNED))
            for fname in pointers:
                try:
                    named = _versions_in(self._read_json_at(mfd, fname))
                except FileNotFoundError:
                    continue
                except (RegistryError, OSError) as e:
                    raise RegistryError(f"pointer {name}/{fname} cannot be read ({e}): gc deletes nothing while "
                                        f"it may name a version in use", "pointer_corrupt") from e
                for v in sorted(named, key=int):
                    hold(v, f"named by {fname}")
        for v, info in sorted(self.pins(name).items()):
            note = info.get("note") if isinstance(info, dict) else None
            hold(v, f"pinned ({note})" if note else "pinned")
        leases = self.leases(name, lease_ttl_s, now)
        for lease in leases:
            if lease.fresh:
                for role, v in sorted(lease.versions.items()):
                    hold(v, f"leased by {lease.instance} ({role})")
        for v in versions[-keep_last:]:
            hold(v, f"last {keep_last}")
        for v in versions:
            age = self._age(name, v, now)
            if age is None or age < min_age_s:
                hold(v, "age unknown" if age is None else f"younger than {min_age_s:g} s")
        return keep, leases

    def _age(self, name: str, version: str, now: float) -> float | None:
        """Seconds since version was published: by its manifest's created (the registry clock),
        else by its folder's mtime (the file system's clock, so against time.time()): a version
        whose manifest cannot be read is still aged, so a broken one does not stay forever."""
        try:
            created = _parse_created(self.manifest(name, version).created)
            if created is not None:
                return now - created
        except RegistryError:
            pass
        try:
            return time.time() - os.lstat(self.version_dir(name, version)).st_mtime
        except OSError:
            return None
