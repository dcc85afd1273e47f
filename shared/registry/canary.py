"""The CANARY pointer's format: a candidate version meeting live traffic beside CURRENT (mode,
share, since when), and the request-key bucket that decides which version answers a key
(ModelRegistry.start_canary/promote/abort_canary write it; serving reads it)."""
from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Mapping

from shared.registry.manifest import CREATED_FORMAT, RegistryError, validate_version

CANARY = "CANARY"
CANARY_MODES = ("canary", "shadow")


@dataclasses.dataclass(frozen=True)
class CanaryState:
    """What CANARY says: the candidate version, how it meets traffic, since when.

    mode "canary": requests whose key hashes below `share` are answered by it (see
    `canary_bucket`); "shadow": it scores every request and answers none (share is then 1).
    started: registry clock (Unix seconds) when it was started; champion: CURRENT at that
    moment (what it is compared with; a promote in between makes the canary stale)."""

    version: str
    mode: str
    share: float
    started: float
    champion: str | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "mode": self.mode, "share": self.share, "started": self.started,
                "started_utc": time.strftime(CREATED_FORMAT, time.gmtime(self.started)),
                "champion": self.champion, "note": self.note}

    @classmethod
    def from_json(cls, d: Any) -> "CanaryState":
        if not isinstance(d, Mapping):
            raise RegistryError("CANARY is not a JSON object", "pointer_corrupt")
        try:
            state = cls(version=validate_version(d["version"]), mode=str(d["mode"]), share=float(d["share"]),
                        started=float(d["started"]),
                        champion=validate_version(d["champion"]) if d.get("champion") is not None else None,
                        note=str(d.get("note") or ""))
        except (KeyError, TypeError, ValueError, RegistryError) as e:
            raise RegistryError(f"CANARY is malformed: {e}", "pointer_corrupt") from e
        check_canary(state.mode, state.share)
        return state


def check_canary(mode: str, share: float) -> None:
    """RegistryError unless mode is canary|shadow and share in (0, 1] (a finite number)."""
    if mode not in CANARY_MODES:
        raise RegistryError(f"canary mode {mode!r}: one of {', '.join(CANARY_MODES)}", "invalid")
    if not (isinstance(share, (int, float)) and 0.0 < share <= 1.0):
        raise RegistryError(f"canary share {share!r}: a number in (0, 1]", "invalid")


def canary_bucket(name: str, version: str, key: str | bytes) -> float:
    """Where a request key falls in [0, 1) for the canary of name/version: sha256 of the model,
    the canary version and the key, first 8 bytes as a fraction. The same on every replica and
    after restarts (no process state, no salt), so one key is always answered by the same
    version while a canary runs; the version is part of it so that each canary draws its own
    sample of keys (the same customers are not the guinea pigs of every candidate)."""
    if isinstance(key, str):
        key = key.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(b"storefront-canary\x00%s\x00%s\x00%s" % (name.encode(), version.encode(), key)).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
