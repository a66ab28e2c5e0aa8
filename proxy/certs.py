"""Small X.509 helpers: a private CA and server certificates signed by it (EC P-256 keys).

Used by ``proxy certs`` (a certificate for the proxy's local TLS listeners) and by the test
servers. Keys are written unencrypted, readable by the owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    """Not-before (a minute ago, for clock skew) and not-after (``days`` from now)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=days)


def create_ca(common_name: str, days: int = 3650,
              permitted: Iterable[str] | None = None) -> tuple[PrivateKey, x509.Certificate]:
    """A self-signed CA certificate (may sign server certificates only: path length 0).

    With ``permitted`` (host names and IP addresses) the CA carries name constraints: a
    certificate it signs for any other name is rejected by clients, so a computer that trusts
    it (and a stolen CA key) cannot be used to impersonate other servers.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if permitted is not None:
        subtrees = [_name_constraint(n) for n in dict.fromkeys(permitted)]
        builder = builder.add_extension(x509.NameConstraints(permitted_subtrees=subtrees, excluded_subtrees=None),
                                        critical=True)
    return key, builder.sign(key, hashes.SHA256())


def _name_constraint(name: str) -> x509.GeneralName:
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return x509.DNSName(name)
    return x509.IPAddress(ipaddress.ip_network(f"{address}/{address.max_prefixlen}"))


def _general_name(name: str) -> x509.GeneralName:
    """An IP address entry for "127.0.0.1" or "::1", a DNS entry otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def create_server_cert(ca_key: PrivateKey, ca_cert: x509.Certificate, names: list[str],
                       days: int = 825) -> tuple[PrivateKey, x509.Certificate]:
    """A TLS server certificate for ``names`` (DNS names and/or IP addresses), signed by the CA.

    The first name becomes the subject's common name; all of them go into subjectAltName.
    """
    if not names:
        raise ValueError("a server certificate needs at least one name")
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    ca_end = getattr(ca_cert, "not_valid_after_utc", None) or \
        ca_cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)  # cryptography < 42
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(min(not_after, ca_end))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_key(path: str | os.PathLike[str], key: PrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM to a file created with mode 0600 (replacing it)."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path = Path(path)
    path.unlink(missing_ok=True)  # O_CREAT's mode only applies to a new file
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_cert(path: str | os.PathLike[str], cert: x509.Certificate | Iterable[x509.Certificate]) -> None:
    """Write one certificate, or a chain (leaf first), as PEM."""
    certs = [cert] if isinstance(cert, x509.Certificate) else list(cert)
    Path(path).write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


#: Names every local server certificate covers; ``proxy certs --name`` adds more.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_HOST_NAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


@dataclass(frozen=True)
class LocalCerts:
    """The files ``proxy certs`` writes into one folder."""

    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        return self.directory / "ca.key"

    @property
    def cert_file(self) -> Path:
        return self.directory / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.directory / "server.key"

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.ca_file, self.ca_key_file, self.cert_file, self.key_file)


def check_name(name: str) -> str:
    """A host name or IP address for a certificate; raises ValueError otherwise."""
    name = name.strip()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(name):
        raise ValueError(f"not a host name or IP address: {name!r}")
    return name.rstrip(".").lower()


def create_local_certs(directory: str | os.PathLike[str], names: Iterable[str] = (), *, force: bool = False,
                       days: int = 825) -> tuple[LocalCerts, list[str]]:
    """A local CA (name-constrained to the certificate's names) and a server certificate for
    localhost, 127.0.0.1, ::1 and ``names``. Returns the files and the names covered.

    Raises FileExistsError naming the existing files unless ``force``.
    """
    certs = LocalCerts(Path(directory))
    all_names = list(dict.fromkeys([*LOCAL_NAMES, *(check_name(n) for n in names)]))
    existing = [str(p) for p in certs.files if p.exists()]
    if existing and not force:
        raise FileExistsError(f"already there: {', '.join(existing)} (use --force to replace them; "
                              "clients must then trust the new CA)")
    certs.directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = create_ca(f"oauth2-mail-proxy local CA ({_short_host()})", days=max(days, 3650),
                                permitted=all_names)
    key, cert = create_server_cert(ca_key, ca_cert, all_names, days=days)
    write_key(certs.ca_key_file, ca_key)
    write_key(certs.key_file, key)
    write_cert(certs.ca_file, ca_cert)
    write_cert(certs.cert_file, cert)
    return certs, all_names


def _short_host() -> str:
    import socket
    return re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())[:60] or "localhost"
