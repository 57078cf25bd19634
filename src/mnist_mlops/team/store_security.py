"""The object store's inside, closed to strangers: JWT keys and mutual TLS for SeaweedFS.

Without them every internal port of `weed server` answers anyone on the
machine: the filer's HTTP API reads, writes and deletes any object (a PUT
got 201, a DELETE 204), the master's deletes whole collections, and the gRPC
ports do the same for whoever speaks gRPC. `security_toml` writes the
`security.toml` SeaweedFS reads from its working folder:

- **JWT keys** (`jwt.signing`, `jwt.filer_signing`, and their `.read`
  twins), each HMAC-SHA256 of the store's secret and its name: the volume and
  filer servers refuse a read or a write without a token signed with them;
- **mutual TLS** on every gRPC port and on the master's, volume server's and
  filer's HTTP ports, with a private CA made at each start: a connection
  without the store's own client certificate fails its handshake. The S3
  gateway alone speaks plain HTTP, and checks every request's signature.

The CA's and the certificate's keys live in the store's runtime folder
(0700, removed when it stops) and are made anew at every start, so nothing
outside the running process ever holds them.
"""

from __future__ import annotations

import hashlib
import hmac
import subprocess
from pathlib import Path

JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
GRPC_SERVICES = ("master", "volume", "filer", "s3", "client")
HTTPS_SERVICES = ("master", "volume", "filer")
# The host name is not checked by SeaweedFS; one certificate serves every part.
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class StoreSecurityError(RuntimeError):
    """The store's certificates could not be made."""


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, certificate, key) for the store's parts, made in `folder`."""
    (folder / "tls.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    commands = [
        [
            *("openssl", "req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.crt"),
            *("-days", "3650", "-subj", "/CN=mnist-mlops object store CA"),
        ],
        [
            *("openssl", "req", *_EC, "-keyout", "store.key", "-out", "store.csr"),
            *("-subj", "/CN=mnist-mlops object store"),
        ],
        [
            *("openssl", "x509", "-req", "-in", "store.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
            *("-CAcreateserial", "-days", "3650", "-out", "store.crt", "-extfile", "tls.ext"),
        ],
    ]
    for command in commands:
        try:
            done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise StoreSecurityError("openssl is not installed (Debian: openssl)") from None
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            raise StoreSecurityError(f"openssl failed: {lines[-1]}")
    return folder / "ca.crt", folder / "store.crt", folder / "store.key"


def security_toml(secret: bytes, folder: Path) -> str:
    """SeaweedFS's security.toml: JWT keys from `secret`, mutual TLS, certificates in `folder`."""
    ca, certificate, key = make_certificates(folder)
    sections = []
    for name in JWT_SECTIONS:
        signing_key = hmac.new(secret, name.encode(), hashlib.sha256).hexdigest()
        sections.append(f'[{name}]\nkey = "{signing_key}"\nexpires_after_seconds = 60\n')
    pair = f'cert = "{certificate}"\nkey = "{key}"\n'
    sections.append(f'[grpc]\nca = "{ca}"\n')
    sections += [f"[grpc.{service}]\n{pair}" for service in GRPC_SERVICES]
    sections += [f'[https.{service}]\n{pair}ca = "{ca}"\n' for service in HTTPS_SERVICES]
    sections.append(f'[https.client]\nenabled = true\n{pair}ca = "{ca}"\n')
    return "\n".join(sections)
