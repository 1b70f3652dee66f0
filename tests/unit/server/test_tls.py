"""The server's own CA and certificate."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from kura.errors import UsageError
from kura.server import tls
from kura.server.serve import ServerConfig, tls_files


def _sans(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(
        san.get_values_for_type(x509.DNSName))


def test_created_once_then_reissued_for_new_names_from_the_same_ca(tmp_path: Path) -> None:
    first = tls.ensure_tls(tmp_path, ["127.0.0.2"])
    fp = first.ca_fingerprint
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    assert {"127.0.0.2", "127.0.0.1", "localhost"} <= _sans(first.cert)
    cert_bytes = first.cert.read_bytes()
    assert tls.ensure_tls(tmp_path, ["127.0.0.2"]).cert.read_bytes() == cert_bytes
    again = tls.ensure_tls(tmp_path, ["127.0.0.2", "backup.example"])
    assert again.ca_fingerprint == fp  # pinned clients keep working
    assert "backup.example" in _sans(again.cert)


def test_given_certificate_is_used_as_is(tmp_path: Path) -> None:
    own = tls.ensure_tls(tmp_path / "pki", ["127.0.0.1"])
    cfg = ServerConfig(state_dir=tmp_path / "state", tls_cert=own.cert, tls_key=own.key,
                       tls_ca=own.ca)
    files = tls_files(cfg)
    assert files.cert == own.cert and files.ca == own.ca
    assert not (tmp_path / "state" / "ca.pem").exists()
    with pytest.raises(UsageError, match="go together"):
        tls_files(ServerConfig(state_dir=tmp_path / "s2", tls_cert=own.cert))
