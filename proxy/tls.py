"""TLS contexts: verified client connections to the upstream servers."""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A context that verifies the server's certificate and host name (TLS 1.2 or newer).

    The system's trust store is always used; ``ca_file`` adds a CA (for example a company's
    TLS-inspecting proxy, or the test servers' CA).
    """
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def describe_tls_error(exc: BaseException) -> str:
    """A short, secret-free explanation of a TLS handshake failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or exc.__class__.__name__})"
    return exc.__class__.__name__


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A context for the proxy's own TLS listeners (TLS 1.2 or newer, no client certificates).

    Call :func:`reload_server_context` on the same object to pick up renewed files: new
    connections use them, open ones keep theirs. Raises OSError or ssl.SSLError with a
    message naming the file if the certificate or key cannot be used.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    reload_server_context(context, cert_file, key_file)
    return context


def reload_server_context(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except ssl.SSLError as exc:
        raise ssl.SSLError(exc.errno, f"cannot use {cert_file} with {key_file}: {exc.reason or exc}") from None
