"""Keys of a repository: the master key, its wrapping, chunk ids, sealing.

The **master key** is 96 random bytes made at ``repo init``:

- ``data key`` (bytes 0-31): AES-256-GCM key that encrypts blobs;
- ``id key`` (32-63): HMAC-SHA256 key of chunk ids, so that two repositories
  never share ids and an id reveals nothing about the data without the key;
- ``mac key`` (64-95): HMAC-SHA256 key that authenticates blobs of an
  unencrypted repository and the repository ``config``.

**Wrapping.** With encryption the master key is stored in ``config`` only in
wrapped form: ``AES-256-GCM(kek, nonce, master, aad="kura-master-key:" + repo id)``
where ``kek = scrypt(passphrase, salt, N, r, p)``. A wrong passphrase (or a key
of another repository) fails the tag check and raises ``WrongPassphrase``. With
``--encryption none`` the master key is stored in the clear (``kdf: "none"``):
ids stay keyed and metadata authenticated, which detects damage but not a
forger who can read ``config``.

The wrapped-key dict (the ``key`` member of ``config``) is also the content of an
exported key file, together with the repository id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from kura.errors import IntegrityError, UnsupportedFormat, WrongPassphrase

MASTER_KEY_SIZE = 96
NONCE_SIZE = 12
TAG_SIZE = 16
MAC_SIZE = 32
ID_SIZE = 32
DEFAULT_SCRYPT_N = 1 << 15
ENCRYPTIONS = ("aes-256-gcm", "none")


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise IntegrityError(f"{what}: expected a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise IntegrityError(f"{what}: invalid base64 ({exc})") from None


@dataclass(frozen=True, repr=False)
class MasterKey:
    """The three keys of a repository (never printed: ``repr`` hides them)."""

    data_key: bytes
    id_key: bytes
    mac_key: bytes

    def __repr__(self) -> str:
        return "MasterKey(<secret>)"

    @classmethod
    def generate(cls) -> MasterKey:
        return cls.from_bytes(os.urandom(MASTER_KEY_SIZE))

    @classmethod
    def from_bytes(cls, raw: bytes) -> MasterKey:
        if len(raw) != MASTER_KEY_SIZE:
            raise IntegrityError(f"master key has {len(raw)} bytes, expected {MASTER_KEY_SIZE}")
        return cls(raw[:32], raw[32:64], raw[64:96])

    def to_bytes(self) -> bytes:
        return self.data_key + self.id_key + self.mac_key

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        """The id of a chunk: HMAC-SHA256 of its plaintext under the id key."""
        return hmac.digest(self.id_key, data, "sha256")

    def mac(self, *parts: bytes | memoryview) -> bytes:
        h = hmac.new(self.mac_key, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.digest()

    def aead(self) -> AESGCM:
        return AESGCM(self.data_key)


def _kek(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _aad(repo_id: str) -> bytes:
    return b"kura-master-key:" + repo_id.encode()


def wrap_key(master: MasterKey, repo_id: str, passphrase: bytes | None, *,
             scrypt_n: int = DEFAULT_SCRYPT_N) -> dict[str, Any]:
    """The ``key`` dict stored in ``config`` (and in key files)."""
    if passphrase is None:
        return {"kdf": "none", "master": b64e(master.to_bytes())}
    salt = os.urandom(16)
    nonce = os.urandom(NONCE_SIZE)
    r, p = 8, 1
    wrapped = AESGCM(_kek(passphrase, salt, scrypt_n, r, p)).encrypt(
        nonce, master.to_bytes(), _aad(repo_id))
    return {"kdf": "scrypt", "n": scrypt_n, "r": r, "p": p, "salt": b64e(salt),
            "cipher": "aes-256-gcm", "nonce": b64e(nonce), "wrapped": b64e(wrapped)}


def key_needs_passphrase(key: dict[str, Any]) -> bool:
    return key.get("kdf") != "none"


def unwrap_key(key: dict[str, Any], repo_id: str, passphrase: bytes | None,
               where: str) -> MasterKey:
    """Recover the master key from its ``key`` dict; ``where`` names the file."""
    kdf = key.get("kdf")
    if kdf == "none":
        return MasterKey.from_bytes(b64d(key.get("master"), f"{where}: key.master"))
    if kdf != "scrypt" or key.get("cipher") != "aes-256-gcm":
        raise UnsupportedFormat(
            f"{where}: unknown key derivation {kdf!r} / cipher {key.get('cipher')!r}",
            hint="written by a newer kura? upgrade kura",
        )
    if passphrase is None:
        raise WrongPassphrase(
            f"the repository key in {where} is encrypted and no passphrase was given",
            hint="set KURA_PASSPHRASE or pass --passphrase-file",
        )
    try:
        n, r, p = int(key["n"]), int(key["r"]), int(key["p"])
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"{where}: key parameters are damaged") from None
    if not (2 <= n <= 1 << 22 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise IntegrityError(f"{where}: implausible scrypt parameters n={n} r={r} p={p}")
    salt = b64d(key.get("salt"), f"{where}: key.salt")
    nonce = b64d(key.get("nonce"), f"{where}: key.nonce")
    wrapped = b64d(key.get("wrapped"), f"{where}: key.wrapped")
    try:
        raw = AESGCM(_kek(passphrase, salt, n, r, p)).decrypt(nonce, wrapped, _aad(repo_id))
    except (InvalidTag, ValueError):
        raise WrongPassphrase(
            f"wrong passphrase for the repository key in {where}",
            hint="check KURA_PASSPHRASE / --passphrase-file, or import the right key file",
        ) from None
    return MasterKey.from_bytes(raw)
