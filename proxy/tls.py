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
