"""TLS for the agent port: a self-signed certificate for the embedded default.

Security is on by default: the server never listens in clear text. Agents
verify the server against the certificate file (``--cafile``), which the
embedded default prints on start.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine.fsutil import private_dir, write_durably
from engine.keys import check_private


def generate_self_signed(cert_path: Path, key_path: Path, hostnames: list[str] | None = None) -> None:
    """Write a P-256 key and a 10-year self-signed certificate for localhost and this host."""
    names = ["localhost", socket.gethostname(), *(hostnames or [])]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blockferry process server")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys(names)]
    alt_names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    private_dir(key_path.parent)
    write_durably(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), mode=0o600)
    write_durably(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    check_private(key_path, "TLS key file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def client_context(cafile: Path | None) -> ssl.SSLContext:
    """Verify the server: against ``cafile`` if given, else the system trust store."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cafile) if cafile else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
