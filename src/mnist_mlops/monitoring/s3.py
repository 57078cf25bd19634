"""A small S3 client for the inference log: put, get, delete and list, signed with SigV4.

The served model's environment has no boto3 on purpose: botocore alone is
31 MB, more than the serving image may grow. Four calls and AWS's
Signature Version 4 are all the log needs; the signature is checked against
botocore's in the tests, and every call against the team's object store.

Credentials and endpoint come from the variables boto3, DVC and MLflow read:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN),
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (else AWS itself), AWS_REGION or
AWS_DEFAULT_REGION (else us-east-1). Buckets are addressed by path.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import urllib.parse
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

TIMEOUT_SECONDS = 10
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class S3Error(OSError):
    """The store refused or could not be reached; the message says which and why."""


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str = ""


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix/")."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise ValueError(f"expected s3://BUCKET[/PREFIX], got {url!r}")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


def signature_headers(
    method: str,
    url: str,
    body: bytes,
    credentials: Credentials,
    region: str,
    now: datetime.datetime,
) -> dict[str, str]:
    """The headers that sign one request (AWS Signature Version 4, service s3)."""
    parsed = urllib.parse.urlsplit(url)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    headers = {
        "host": parsed.netloc,
        "x-amz-content-sha256": hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256,
        "x-amz-date": stamp,
    }
    if credentials.token:
        headers["x-amz-security-token"] = credentials.token
    query = sorted(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
    canonical_query = "&".join(
        f"{urllib.parse.quote(key, safe='-_.~')}={urllib.parse.quote(value, safe='-_.~')}"
        for key, value in query
    )
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            method,
            urllib.parse.quote(parsed.path or "/", safe="/-_.~"),
            canonical_query,
            "".join(f"{name}:{headers[name].strip()}\n" for name in sorted(headers)),
            signed,
            headers["x-amz-content-sha256"],
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{credentials.secret_key}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    del headers["host"]  # urllib sends the URL's own
    return headers


class S3Client:
    """One bucket's objects, as the environment's credentials see them."""

    def __init__(self, bucket: str, environ: dict[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        access, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            raise S3Error(
                "no keys for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                '(eval "$(mnist-mlops object-store --keys serving)")'
            )
        self.credentials = Credentials(access, secret, environ.get("AWS_SESSION_TOKEN", ""))
        self.region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
        self.endpoint = (endpoint or f"https://s3.{self.region}.amazonaws.com").rstrip("/")
        self.bucket = bucket

    def _call(self, method: str, key: str = "", query: str = "", body: bytes = b"") -> bytes:
        import urllib.error
        import urllib.request

        url = f"{self.endpoint}/{self.bucket}/{urllib.parse.quote(key, safe='/-_.~')}"
        if query:
            url += f"?{query}"
        now = datetime.datetime.now(datetime.UTC)
        headers = signature_headers(method, url, body, self.credentials, self.region, now)
        if method == "PUT":
            headers["content-type"] = "application/octet-stream"
        request = urllib.request.Request(url, data=body or None, method=method, headers=headers)
        if method == "PUT" and not body:
            request.data = b""
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = _error_code(error.read())
            if error.code == 404 and key:
                raise FileNotFoundError(f"{self.endpoint}/{self.bucket}/{key}: {detail}") from None
            raise S3Error(
                f"{method} {self.endpoint}/{self.bucket}/{key}: {error.code} {detail}".rstrip()
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            raise S3Error(f"the object store at {self.endpoint} is unreachable: {reason}") from None

    def put(self, key: str, body: bytes) -> None:
        self._call("PUT", key, body=body)

    def get(self, key: str) -> bytes:
        return self._call("GET", key)

    def delete(self, key: str) -> None:
        self._call("DELETE", key)

    def list(self, prefix: str) -> list[S3Object]:
        """Every object under `prefix` (ListObjectsV2, page by page)."""
        objects: list[S3Object] = []
        token = ""
        while True:
            fields = {"list-type": "2", "prefix": prefix}
            if token:
                fields["continuation-token"] = token
            query = urllib.parse.urlencode(sorted(fields.items()), quote_via=urllib.parse.quote)
            root = ElementTree.fromstring(self._call("GET", query=query))
            for item in _children(root, "Contents"):
                modified = _text(item, "LastModified").replace("Z", "+00:00")
                objects.append(
                    S3Object(
                        _text(item, "Key"),
                        int(_text(item, "Size") or 0),
                        datetime.datetime.fromisoformat(modified).timestamp(),
                    )
                )
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                return objects


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ElementTree.Element, name: str) -> str:
    found = _children(element, name)
    return (found[0].text or "") if found else ""


def _error_code(body: bytes) -> str:
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return ""
    return " ".join(filter(None, [_text(root, "Code"), _text(root, "Message")]))
