"""What a registry version is: the manifest (signature, files, lineage, metrics), its tensor
specs and value ranges, and the validation of names, versions and file names that every
path of the registry goes through (shared.registry.registry stores them)."""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any, Mapping

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,11}$")
MANIFEST = "manifest.json"
CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


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
