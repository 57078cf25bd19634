"""The inference log's own S3 client: its signature against botocore's, its errors in one line."""

import datetime
import sys

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from mnist_mlops.monitoring.s3 import Credentials, S3Client, S3Error, signature_headers, split_url

from ..conftest import run, subprocess_env

NOW = datetime.datetime(2026, 12, 4, 11, 30, 5, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("method", "url", "body", "token"),
    [
        ("GET", "http://127.0.0.1:8333/inference?list-type=2&prefix=team%2Fa%20b", b"", ""),
        ("PUT", "http://127.0.0.1:8333/inference/team/rows-h.1.2.ab-00000001.npz", b"x" * 99, ""),
        ("DELETE", "https://s3.eu-west-1.amazonaws.com/b/k~1", b"", "session-token"),
    ],
)
def test_the_signature_is_botocores(monkeypatch, method, url, body, token):
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: NOW.replace(tzinfo=None))
    mine = signature_headers(method, url, body, Credentials("AKID", "secret/key", token), "r1", NOW)
    request = AWSRequest(method=method, url=url, data=body)
    request.context["payload_signing_enabled"] = True
    S3SigV4Auth(BotoCredentials("AKID", "secret/key", token or None), "s3", "r1").add_auth(request)
    assert mine["authorization"] == request.headers["Authorization"]
    assert mine["x-amz-date"] == request.headers["X-Amz-Date"]


def test_urls_keys_and_an_absent_store_get_one_clear_line():
    assert split_url("s3://inference/team/eu") == ("inference", "team/eu/")
    assert split_url("s3://inference") == ("inference", "")
    for bad in ("s3:///prefix", "http://host/b", "s3://b/p?x=1"):
        with pytest.raises(ValueError, match="expected s3://BUCKET"):
            split_url(bad)
    with pytest.raises(S3Error, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        S3Client("inference", {})
    closed = S3Client(
        "inference",
        {
            "AWS_ACCESS_KEY_ID": "a",
            "AWS_SECRET_ACCESS_KEY": "b",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        },
    )
    with pytest.raises(S3Error, match=r"the object store at http://127\.0\.0\.1:9 is unreachable"):
        closed.list("")


def test_a_server_without_keys_or_with_a_bad_url_says_so_in_one_line(tmp_path):
    env = subprocess_env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name, None)
    for log_dir, message in [
        ("s3://inference/team", "no keys for the object store"),
        ("s3:///team", "argument --log-dir: expected s3://BUCKET"),
    ]:
        result = run(
            [sys.executable, "-m", "mnist_mlops", "serve", "--log-dir", log_dir],
            tmp_path,
            env,
            check=False,
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
