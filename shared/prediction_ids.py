"""Prediction ids: unguessable and verifiable by every replica holding the deployment's key
(HMAC-signed), the key file that holds the keys, and the bounded memory of the ids a replica
served recently (shared.domain admits outcomes by them)."""
from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

_RANDOM_BYTES = 16  # 128 bits: nobody guesses another caller's id
_MAC_BYTES = 16     # HMAC-SHA256 truncated to 128 bits
PREDICTION_ID_LEN = 45  # 22 + 1 + 22 base64url characters; common.proto allows 64


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class PredictionIds:
    """Unguessable, verifiable prediction ids: `<128 random bits>.<128-bit HMAC>` (base64url).

    keys: the first signs new ids, all verify (list a new key first and keep the old one while
    its ids may still get outcomes, to rotate). None: a random key held in memory only, so ids
    verify only in this process (tests; a deployment passes its key file's keys). The domain's
    name is part of the MAC, so a fraud id is no pricing id even under one key.
    legacy_domain: the number the domain's ids were signed with before domains were named
    (feedback.proto's retired enum); ids signed so still verify (a chargeback comes weeks later)."""

    def __init__(self, keys: list[bytes] | None = None, domain: str = "", legacy_domain: int | None = None) -> None:
        self.keys = list(keys) if keys else [secrets.token_bytes(32)]
        if any(len(k) < 16 for k in self.keys):
            raise ValueError("prediction id keys must have at least 128 bits")
        self._tag = b"storefront-prediction-id\x00" + domain.encode() + b"\x00"
        self._tags = [self._tag]
        if legacy_domain is not None:
            self._tags.append(b"storefront-prediction-id\x00%d\x00" % int(legacy_domain))

    def _mac(self, key: bytes, nonce: bytes, tag: bytes | None = None) -> bytes:
        return hmac.new(key, (self._tag if tag is None else tag) + nonce, hashlib.sha256).digest()[:_MAC_BYTES]

    def next(self) -> str:
        nonce = secrets.token_bytes(_RANDOM_BYTES)
        return f"{_b64(nonce)}.{_b64(self._mac(self.keys[0], nonce))}"

    def verify(self, prediction_id: str) -> bool:
        """True when some key signed this id (constant time in the MAC comparison)."""
        if len(prediction_id) != PREDICTION_ID_LEN or prediction_id[22:23] != ".":
            return False
        try:
            nonce = base64.urlsafe_b64decode(prediction_id[:22] + "==")
            mac = base64.urlsafe_b64decode(prediction_id[23:] + "==")
        except (ValueError, TypeError):
            return False
        if len(nonce) != _RANDOM_BYTES or len(mac) != _MAC_BYTES:
            return False
        # 22 base64 characters carry 132 bits: refuse the non-canonical spellings of the same bytes,
        # so that one prediction has exactly one id (duplicates are recognized by the id string).
        if f"{_b64(nonce)}.{_b64(mac)}" != prediction_id:
            return False
        ok = False
        for key in self.keys:  # every key and tag, so the time taken does not tell which one matched
            for tag in self._tags:
                ok |= hmac.compare_digest(self._mac(key, nonce, tag), mac)
        return ok


def load_prediction_id_keys(path: str | Path) -> list[bytes]:
    """The keys in a key file (one hex key per line, the first signs; '#' comments), creating the
    file with one random 256-bit key (mode 0600) when it does not exist. Creation is atomic
    (write a temporary file, then link it into place), so replicas and workers starting together
    on one host all end up with the same key."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it first: then theirs is used
            log.info("created prediction id key %s (share it with every replica of this deployment)", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    keys = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a hex key") from None
        if len(key) < 16:
            raise ValueError(f"{path}:{n}: a key needs at least 128 bits (32 hex digits)")
        keys.append(key)
    if not keys:
        raise ValueError(f"{path}: no key in it")
    return keys


class ServedIds:
    """Bounded memory of the prediction ids this replica served recently (the oldest go first)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def add(self, prediction_id: str) -> None:
        self._ids[prediction_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, prediction_id: str) -> bool:
        return prediction_id in self._ids
