"""A throwaway certificate authority for tests and demos: a CA file to trust, server contexts to serve.

Made fresh by each `TestCA` (trustme, a test dependency), so nothing a test trusts
outlives it. `server_context()` answers for 127.0.0.1 and localhost, the simulator's
addresses; `server_context("example.invalid")` is a certificate for some other name, which a
client that checks names must refuse. Two TestCA objects are two unrelated authorities: a
server context of one is "signed by an unknown CA" to a client trusting the other.
"""

import ssl
from pathlib import Path

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


class TestCA:
    __test__ = False                    # a helper, not a test class

    def __init__(self):
        import trustme                  # test-only dependency: imported when a test asks for TLS

        self._ca = trustme.CA(organization_name="lamina-llm-cache test CA")

    def write_ca_file(self, path: Path) -> Path:
        """Write the CA certificate (PEM) to `path`: what SSL_CERT_FILE or REQUESTS_CA_BUNDLE points at."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._ca.cert_pem.write_to_path(str(path))
        return path

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server-side context with a certificate this CA issued for `names` (default: loopback)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert(*(names or LOOPBACK_NAMES)).configure_cert(context)
        return context
