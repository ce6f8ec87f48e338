"""The one TLS trust policy, for the Hub and its CDN alike: which authorities a connection
trusts, and how a refused certificate is told to the user.

The authorities are the system's, unless the environment names a bundle the way Python
and huggingface_hub users already do (settings.py reads it: `SSL_CERT_FILE`, else
`REQUESTS_CA_BUNDLE`, else `CURL_CA_BUNDLE`; a file of PEM certificates or a hashed
directory). Then that bundle alone is trusted, as requests and curl do. Every connection
to the Hub and its CDN is made by connections.Pool (the range reader's and the Hub
client's, hub.py), so this one context is the whole policy.

Certificates are always checked, names included: there is no switch to turn that off. A
refused certificate is not retried (another try meets the same certificate) and its
message says what to do about a private CA.
"""

import ssl
from pathlib import Path

FIX_HINT = "if the server's certificate comes from a private CA, point SSL_CERT_FILE or REQUESTS_CA_BUNDLE at it"


def client_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """A client context that verifies certificates and names against `ca_bundle`, or the system's CAs."""
    if ca_bundle is None:
        return ssl.create_default_context()
    if Path(ca_bundle).is_dir():
        return ssl.create_default_context(capath=str(ca_bundle))
    return ssl.create_default_context(cafile=str(ca_bundle))


def refused_certificate(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind `exc` (itself, or one of its causes), or None."""
    seen = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def describe(refusal: ssl.SSLCertVerificationError, host: str) -> str:
    """One line for the user: which host, why its certificate was refused, and the fix."""
    reason = refusal.verify_message or refusal.reason or str(refusal)
    return f"TLS certificate of {host} refused ({reason}); {FIX_HINT}"
