"""Keys of a repository: the master key, its wrapping, chunk ids, sealing.

The **master key** is 96 random bytes made at ``repo init``:

- ``data key`` (bytes 0-31): AES-256-GCM key that encrypts blobs;
- ``id key`` (32-63): key of chunk ids, so that two repositories never share
  ids and an id reveals nothing about the data without the key. The id
  algorithm is a repository setting (``ID_ALGORITHMS``): keyed BLAKE3 for new
  repositories (about 5x faster than HMAC-SHA256 on one core), HMAC-SHA256 for
  repositories made before it existed; both give 32-byte ids;
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
from dataclasses import dataclass, field
from typing import Any

import blake3
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
ID_BLAKE3 = "blake3-keyed"
ID_HMAC_SHA256 = "hmac-sha256"
ID_ALGORITHMS = (ID_BLAKE3, ID_HMAC_SHA256)
DEFAULT_ID_ALGORITHM = ID_BLAKE3


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
    """The three keys of a repository (never printed: ``repr`` hides them).

    ``id_algorithm`` is the repository's chunk id algorithm (from its config);
    it is not part of the key material.
    """

    data_key: bytes
    id_key: bytes
    mac_key: bytes
    id_algorithm: str = field(default=DEFAULT_ID_ALGORITHM, compare=False)

    def __post_init__(self) -> None:
        if self.id_algorithm not in ID_ALGORITHMS:
            raise UnsupportedFormat(f"unknown chunk id algorithm {self.id_algorithm!r}",
                                    hint="written by a newer kura? upgrade kura")

    def __repr__(self) -> str:
        return "MasterKey(<secret>)"

    @classmethod
    def generate(cls, id_algorithm: str = DEFAULT_ID_ALGORITHM) -> MasterKey:
        return cls.from_bytes(os.urandom(MASTER_KEY_SIZE), id_algorithm)

    @classmethod
    def from_bytes(cls, raw: bytes, id_algorithm: str = DEFAULT_ID_ALGORITHM) -> MasterKey:
        if len(raw) != MASTER_KEY_SIZE:
            raise IntegrityError(f"master key has {len(raw)} bytes, expected {MASTER_KEY_SIZE}")
        return cls(raw[:32], raw[32:64], raw[64:96], id_algorithm)

    def with_id_algorithm(self, id_algorithm: str) -> MasterKey:
        """The same keys, computing chunk ids with ``id_algorithm``."""
        return MasterKey(self.data_key, self.id_key, self.mac_key, id_algorithm)

    def to_bytes(self) -> bytes:
        return self.data_key + self.id_key + self.mac_key

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        """The id of a chunk: keyed BLAKE3 (or HMAC-SHA256) of its plaintext under
        the id key. Both release the GIL while hashing a large chunk."""
        if self.id_algorithm == ID_BLAKE3:
            digest: bytes = blake3.blake3(data, key=self.id_key).digest()
            return digest
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
