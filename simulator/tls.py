"""The simulator's self-signed certificate, so provider SDKs that only speak HTTPS (Vonage's)
can talk to it, and the CA bundle that makes them trust it.

Several processes (the simulator, workers, tests) may ask for the certificate at once: it is
made under a file lock and written atomically, so they all end up with the same one."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
BUNDLE_FILE = "bundle.pem"
LIFETIME = timedelta(days=3650)


def ensure_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """(cert.pem, key.pem, bundle.pem) in `directory`, making the certificate the first time.

    The certificate is self-signed for CN=localhost with SANs DNS:localhost and IP:127.0.0.1;
    bundle.pem is certifi's bundle followed by it, for REQUESTS_CA_BUNDLE or an SSL context,
    so real provider hosts still verify beside the simulator."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path, bundle_path = (
        directory / CERT_FILE,
        directory / KEY_FILE,
        directory / BUNDLE_FILE,
    )
    with _locked(directory / ".lock"):
        cert_pem = _usable_certificate(cert_path, key_path)
        if cert_pem is None:
            cert_pem, key_pem = _make_certificate()
            _write_atomically(key_path, key_pem, mode=0o600)
            _write_atomically(cert_path, cert_pem)
        bundle = Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n\n" + cert_pem
        if not bundle_path.exists() or bundle_path.read_bytes() != bundle:
            _write_atomically(bundle_path, bundle)
    return cert_path, key_path, bundle_path


def _usable_certificate(cert_path: Path, key_path: Path) -> bytes | None:
    """The certificate already on disk, unless it is missing, unreadable or about to expire."""
    try:
        cert_pem = cert_path.read_bytes()
        certificate = x509.load_pem_x509_certificate(cert_pem)
        serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if certificate.not_valid_after_utc < datetime.now(UTC) + timedelta(days=1):
        return None
    return cert_pem


def _make_certificate() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + LIFETIME)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        # Self-signed and trusted directly, like `openssl req -x509`: its own CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomically(path: Path, content: bytes, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never half of one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(content)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
