"""Key wrapping, blobs: round trips and every corruption detected (hypothesis)."""

from __future__ import annotations

import hmac
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kura.errors import IntegrityError, UnsupportedFormat, WrongPassphrase
from kura.repository import blob
from kura.repository.crypto import (
    ID_BLAKE3,
    ID_HMAC_SHA256,
    MasterKey,
    unwrap_key,
    wrap_key,
)

KEY = MasterKey.generate()
OTHER = MasterKey.generate()
payloads = st.one_of(st.binary(max_size=5000),
                     st.binary(min_size=1, max_size=50).map(lambda b: b * 100))


def test_wrap_unwrap() -> None:
    k = wrap_key(KEY, "repo1", b"pw", scrypt_n=1 << 10)
    assert unwrap_key(k, "repo1", b"pw", "config").to_bytes() == KEY.to_bytes()
    with pytest.raises(WrongPassphrase):
        unwrap_key(k, "repo1", b"wrong", "config")
    with pytest.raises(WrongPassphrase):  # a key of another repository
        unwrap_key(k, "repo2", b"pw", "config")
    with pytest.raises(WrongPassphrase):
        unwrap_key(k, "repo1", None, "config")
    plain = wrap_key(KEY, "repo1", None)
    assert unwrap_key(plain, "repo1", None, "config").to_bytes() == KEY.to_bytes()
    with pytest.raises(UnsupportedFormat):
        unwrap_key({"kdf": "argon9"}, "repo1", b"pw", "config")
    assert "secret" in repr(KEY) and KEY.data_key.hex() not in repr(KEY)


def test_chunk_ids_are_keyed() -> None:
    assert KEY.chunk_id(b"x") != OTHER.chunk_id(b"x")
    assert KEY.chunk_id(b"x") == KEY.chunk_id(b"x")
    old = KEY.with_id_algorithm(ID_HMAC_SHA256)
    assert old.chunk_id(b"x") != OTHER.with_id_algorithm(ID_HMAC_SHA256).chunk_id(b"x")
    assert old.chunk_id(b"x") != KEY.chunk_id(b"x") and len(old.chunk_id(b"x")) == 32


def test_chunk_id_algorithms_match_their_references() -> None:
    # BLAKE3's published keyed-hash test vector (empty input) and RFC 4231 case 2.
    b3 = MasterKey(bytes(32), b"whats the Elvish word for friend", bytes(32), ID_BLAKE3)
    assert b3.chunk_id(b"").hex() == (
        "92b2b75604ed3c761f9d6f62392c8a9227ad0ea3f09573e783f1498a4ed60d26")
    assert MasterKey.generate().id_algorithm == ID_BLAKE3
    data = os.urandom(3 << 20)
    assert b3.chunk_id(memoryview(data)) == b3.chunk_id(bytearray(data)) == b3.chunk_id(data)
    mac = MasterKey(bytes(32), b"Jefe".ljust(32, b"\0"), bytes(32), ID_HMAC_SHA256)
    assert mac.chunk_id(b"x") == hmac.digest(b"Jefe".ljust(32, b"\0"), b"x", "sha256")
    with pytest.raises(UnsupportedFormat, match="id algorithm"):
        KEY.with_id_algorithm("md5")


@settings(max_examples=60, deadline=None)
@given(data=payloads, encrypt=st.booleans(), level=st.sampled_from([0, 1, 3]))
def test_blob_roundtrip(data: bytes, encrypt: bool, level: int) -> None:
    sealed = blob.seal(KEY, b"bind", data, encrypt=encrypt, level=level)
    assert blob.open_blob(KEY, b"bind", sealed, encrypted=encrypt, what="t",
                          max_size=len(data) + 1) == data
    if encrypt and len(data) > 8:
        assert data not in sealed


def test_blob_compresses_when_useful() -> None:
    text = b"abc" * 10000
    sealed = blob.seal(KEY, b"b", text, encrypt=True, level=3)
    assert len(sealed) < 1000 and sealed[5] & blob.FLAG_COMPRESSED
    noise = os.urandom(4096)
    sealed = blob.seal(KEY, b"b", noise, encrypt=True, level=3)
    assert not sealed[5] & blob.FLAG_COMPRESSED


@settings(max_examples=80, deadline=None)
@given(data=payloads, encrypt=st.booleans(), pos=st.integers(min_value=0),
       flip=st.integers(min_value=1, max_value=255))
def test_any_byte_flip_is_detected(data: bytes, encrypt: bool, pos: int, flip: int) -> None:
    sealed = bytearray(blob.seal(KEY, b"bind", data, encrypt=encrypt, level=3))
    sealed[pos % len(sealed)] ^= flip
    with pytest.raises((IntegrityError, UnsupportedFormat)):
        blob.open_blob(KEY, b"bind", bytes(sealed), encrypted=encrypt, what="t",
                       max_size=1 << 20)


@settings(max_examples=60, deadline=None)
@given(data=payloads, encrypt=st.booleans(), cut=st.integers(min_value=1))
def test_any_truncation_is_detected(data: bytes, encrypt: bool, cut: int) -> None:
    sealed = blob.seal(KEY, b"bind", data, encrypt=encrypt, level=3)
    short = sealed[: len(sealed) - 1 - cut % len(sealed)]
    with pytest.raises(IntegrityError):
        blob.open_blob(KEY, b"bind", short, encrypted=encrypt, what="t", max_size=1 << 20)


@pytest.mark.parametrize("encrypt", [True, False])
def test_binding_key_and_mode_are_checked(encrypt: bool) -> None:
    sealed = blob.seal(KEY, b"one", b"data" * 10, encrypt=encrypt, level=3)
    with pytest.raises(IntegrityError, match="authentication"):
        blob.open_blob(KEY, b"two", sealed, encrypted=encrypt, what="t", max_size=100)
    with pytest.raises(IntegrityError):
        blob.open_blob(OTHER, b"one", sealed, encrypted=encrypt, what="t", max_size=100)
    with pytest.raises(IntegrityError, match="repository"):
        blob.open_blob(KEY, b"one", sealed, encrypted=not encrypt, what="t", max_size=100)


def test_unknown_version_and_size_limit() -> None:
    sealed = bytearray(blob.seal(KEY, b"b", b"x" * 1000, encrypt=False, level=3))
    sealed[4] = 9
    with pytest.raises(UnsupportedFormat, match="version 9"):
        blob.open_blob(KEY, b"b", bytes(sealed), encrypted=False, what="t", max_size=2000)
    ok = blob.seal(KEY, b"b", b"x" * 1000, encrypt=True, level=3)
    with pytest.raises(IntegrityError, match="at most"):
        blob.open_blob(KEY, b"b", ok, encrypted=True, what="t", max_size=100)
