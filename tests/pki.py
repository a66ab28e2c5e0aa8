"""A throw-away PKI for the test servers: one CA and one server certificate for loopback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxy.certs import create_ca, create_server_cert, write_cert, write_key

SERVER_NAMES = ["localhost", "127.0.0.1", "127.0.0.2", "::1"]


@dataclass(frozen=True)
class TestPKI:
    """PEM files: the CA to trust, and the server certificate with its key."""

    __test__ = False  # not a pytest test class despite its name

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_test_pki(directory: str | Path) -> TestPKI:
    """Create ``ca.pem``, ``server.pem`` and ``server.key`` in ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = create_ca("oauth2-mail-proxy test CA")
    key, cert = create_server_cert(ca_key, ca_cert, SERVER_NAMES)
    pki = TestPKI(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    write_cert(pki.ca_file, ca_cert)
    write_cert(pki.cert_file, cert)
    write_key(pki.key_file, key)
    return pki
