"""`mnist-mlops certs`: a private CA and a certificate for 127.0.0.1 and localhost.

For the front door (`mnist-mlops proxy`) on one machine and for the tests;
a deployment uses a certificate of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from mnist_mlops.serving.proxy import DEPLOY_DIR, ProxyError

CERTS_DIR = DEPLOY_DIR / "certs"


def make_certificates(directory: Path = CERTS_DIR) -> list[Path]:
    """A private CA and a server certificate for 127.0.0.1 and localhost, signed by it.

    Written into a temporary folder that is renamed into place, so a failure
    leaves no half-made set; an existing set is kept.
    """
    names = ("ca.crt", "ca.key", "server.crt", "server.key")
    if all((directory / name).exists() for name in names):
        return [directory / name for name in names]
    if directory.exists():
        raise ProxyError(f"{directory} exists but is incomplete: remove it and run again")
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".certs-", dir=directory.parent))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    server_extensions = work / "server.ext"
    server_extensions.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    commands = [
        [
            *("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt"),
            *("-days", "825", "-subj", "/CN=mnist-mlops private CA"),
            *("-addext", "basicConstraints=critical,CA:TRUE"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        ],
        [
            "openssl",
            "req",
            *ec,
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        [
            *("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
            *("-CAcreateserial", "-days", "825", "-out", "server.crt", "-extfile", "server.ext"),
        ],
    ]
    try:
        for command in commands:
            result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise ProxyError(f"openssl failed: {result.stderr.strip().splitlines()[-1]}")
        for name in ("ca.key", "server.key"):
            (work / name).chmod(0o600)
        for name in ("server.csr", "server.ext", "ca.srl"):
            (work / name).unlink(missing_ok=True)
        work.chmod(0o755)
        work.rename(directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [directory / name for name in names]
