"""TLS material for the server: its own certificate authority and certificate.

On first start the server creates, in its state directory:

``ca.pem`` / ``ca.key``
    a private CA (ECDSA P-256, 10 years, path length 0). Its certificate is what
    clients and agents pin; its SHA-256 fingerprint (of the DER encoding) is
    printed by ``kura server token create`` and embedded in enrolment tokens.
``server.pem`` / ``server.key``
    the server's certificate, signed by that CA, with a subjectAltName for every
    listen address (plus ``localhost``). When the server is later asked to listen
    on an address the certificate does not name, the certificate is re-issued
    from the same CA; pinned clients do not notice.

Private keys are written with mode 0600. An administrator who has a PKI passes
``--tls-cert``/``--tls-key`` (and ``--tls-ca`` for the chain clients should
trust) instead, and nothing is generated.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kura.errors import ServerError, UsageError


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint(self.ca.read_bytes())


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, 64 lowercase hex digits."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ServerError("not a PEM certificate", hint="give the server's ca.pem") from exc
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        if not h or h in ("0.0.0.0", "::"):
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def _cert_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return names | set(san.get_values_for_type(x509.DNSName))


def _create_ca(state_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kura server CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kura")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(state_dir / "ca.key", _key_pem(key))
    _write_public(state_dir / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _issue(state_dir: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
           hosts: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cn = next((h for h in hosts if h and h not in ("0.0.0.0", "::")), "localhost")
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(state_dir / "server.key", _key_pem(key))
    _write_public(state_dir / "server.pem", cert.public_bytes(serialization.Encoding.PEM))


def ensure_tls(state_dir: Path, hosts: list[str]) -> TlsFiles:
    """The server's CA and certificate in ``state_dir``, created or re-issued as needed."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        ca_pem, ca_key_path = state_dir / "ca.pem", state_dir / "ca.key"
        if ca_pem.exists() and ca_key_path.exists():
            ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
            loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ServerError(f"{ca_key_path} is not an EC private key",
                                  hint="remove ca.pem and ca.key to create a new CA")
            ca_key = loaded
        else:
            ca, ca_key = _create_ca(state_dir)
        cert_path = state_dir / "server.pem"
        wanted = {str(e.value) for e in _san_entries(hosts)}
        reissue = True
        if cert_path.exists() and (state_dir / "server.key").exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            fresh = cert.not_valid_after_utc > datetime.now(UTC) + timedelta(days=30)
            reissue = not (fresh and wanted <= _cert_names(cert)
                           and cert.issuer == ca.subject)
        if reissue:
            _issue(state_dir, ca, ca_key, hosts)
    except OSError as exc:
        raise ServerError(f"cannot create the server's TLS files in {state_dir}: {exc.strerror}",
                          hint="check that the state directory is writable") from exc
    except ValueError as exc:
        raise ServerError(f"the TLS files in {state_dir} are damaged: {exc}",
                          hint="remove them to create new ones (agents must enrol again)") from exc
    return TlsFiles(ca=state_dir / "ca.pem", cert=cert_path, key=state_dir / "server.key")


def client_context(ca_file: Path | None = None, ca_pem: bytes | None = None) -> ssl.SSLContext:
    """A client SSL context that trusts only the pinned CA (or the system store if none)."""
    ctx = ssl.create_default_context()
    if ca_pem is not None:
        ctx = ssl.create_default_context(cadata=ca_pem.decode())
    elif ca_file is not None:
        try:
            ctx = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ServerError(f"cannot read the CA certificate {ca_file}: {exc}",
                              hint="give the server's ca.pem with --ca or KURA_CA") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The server side's SSL context (the data port's; uvicorn builds the API's alike)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the server certificate {files.cert}: {exc}") from exc
    return ctx
