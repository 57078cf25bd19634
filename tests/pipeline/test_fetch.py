"""Stage fetch: every source kind, and every way a download can go wrong."""

import collections
import hashlib
import http.server
import threading
import time

import numpy as np
import pytest

from mnist_mlops.config import validate
from mnist_mlops.paths import RAW_DATA_DIR
from mnist_mlops.pipeline.fetch import (
    IDX_FILES,
    NPZ_FILE,
    FetchError,
    choose_files,
    fetch,
    parse_checksums,
)
from mnist_mlops.pipeline.raw import content_digest

from ..conftest import REPO_ROOT, compose_config, tiny_overrides


def data_config(source, *overrides):
    return validate(compose_config(*tiny_overrides(source), *overrides)).data


@pytest.fixture
def faulty_mirror(mirror):
    """HTTP on 127.0.0.1 that fails on purpose, by path prefix:

    /truncate/NAME sends half the file under the full Content-Length, then hangs up;
    /flaky/NAME answers 503 to the first request for NAME, then serves it;
    /slow/NAME waits longer than the client's timeout before answering;
    anything else is served from the mirror (404 when absent).
    """
    requests = collections.Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(mirror), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            requests[self.path] += 1
            mode, _, name = self.path.lstrip("/").partition("/")
            if mode == "truncate":
                content = (mirror / name).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content[: len(content) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if mode == "flaky" and requests[self.path] == 1:
                self.send_error(503, "try again")
                return
            if mode == "slow":
                time.sleep(3)
            if mode in ("flaky", "slow"):
                self.path = f"/{name}"
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def test_fetches_npz_from_a_local_folder(workdir, mirror):
    checksums = fetch(data_config(mirror))
    assert list(checksums) == [NPZ_FILE]
    assert (RAW_DATA_DIR / NPZ_FILE).read_bytes() == (mirror / NPZ_FILE).read_bytes()
    assert not [path for path in workdir.rglob("*") if "partial" in path.name]


def test_fetches_from_a_file_url(workdir, mirror):
    fetch(data_config(mirror.as_uri()))
    assert (RAW_DATA_DIR / NPZ_FILE).exists()


def test_fetches_the_four_idx_files_over_http(workdir, http_mirror):
    fetch(data_config(http_mirror, "data.format=idx"))
    assert sorted(path.name for path in RAW_DATA_DIR.iterdir()) == sorted(IDX_FILES.values())


def test_mirror_environment_variable_replaces_the_source(workdir, mirror, monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", str(mirror))
    # The configured source is unreachable and its checksums are the official ones:
    # the mirror's own SHA256SUMS must be used. Tiny data is not MNIST: no content check.
    config = validate(
        compose_config("data.source=http://127.0.0.1:9/nowhere", "data.content_sha256=null")
    ).data
    fetch(config)
    assert (RAW_DATA_DIR / NPZ_FILE).read_bytes() == (mirror / NPZ_FILE).read_bytes()


def test_a_mirrors_own_checksums_never_vouch_for_its_content(workdir, mirror, monkeypatch):
    """A tampered mnist.npz with a SHA256SUMS to match passes the file check, not the content's."""
    monkeypatch.setenv("MNIST_MIRROR", str(mirror))
    expected = content_digest(mirror)
    config = validate(
        compose_config("data.source=http://127.0.0.1:9/nowhere", f"data.content_sha256={expected}")
    ).data
    fetch(config)  # the honest mirror passes both checks
    with np.load(mirror / NPZ_FILE) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["y_train"] = np.zeros_like(arrays["y_train"])  # every training label 0
    np.savez(mirror / NPZ_FILE, **arrays)
    digest = hashlib.sha256((mirror / NPZ_FILE).read_bytes()).hexdigest()
    sums = (mirror / "SHA256SUMS").read_text().splitlines()
    (mirror / "SHA256SUMS").write_text(
        "".join(
            f"{digest}  {NPZ_FILE}\n" if line.endswith(NPZ_FILE) else f"{line}\n" for line in sums
        )
    )
    before = (RAW_DATA_DIR / NPZ_FILE).read_bytes()
    with pytest.raises(FetchError, match="not the pinned ones") as error:
        fetch(config)
    assert expected in str(error.value) and "data.content_sha256" in str(error.value)
    assert (RAW_DATA_DIR / NPZ_FILE).read_bytes() == before  # the previous data is kept


def test_wrong_checksum_names_source_and_both_digests(workdir, mirror):
    actual = hashlib.sha256((mirror / NPZ_FILE).read_bytes()).hexdigest()
    wrong = "0" * 64
    config = data_config(mirror, "data.sha256sums=null", f"data.sha256={{{NPZ_FILE}: '{wrong}'}}")
    with pytest.raises(FetchError) as error:
        fetch(config)
    message = str(error.value)
    assert str(mirror / NPZ_FILE) in message
    assert wrong in message and actual in message
    assert not RAW_DATA_DIR.exists()
    assert list(workdir.joinpath("data").iterdir()) == []


def test_previous_raw_data_survives_a_failed_fetch(workdir, mirror):
    fetch(data_config(mirror))
    before = (RAW_DATA_DIR / NPZ_FILE).read_bytes()
    (mirror / NPZ_FILE).write_bytes(b"corrupted")
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(data_config(mirror))
    assert (RAW_DATA_DIR / NPZ_FILE).read_bytes() == before


def test_truncated_download_is_retried_then_reported(workdir, faulty_mirror, mirror):
    url, requests = faulty_mirror
    checksums = parse_checksums((mirror / "SHA256SUMS").read_text(), "SHA256SUMS")
    config = data_config(
        f"{url}/truncate",
        "data.sha256sums=null",
        f"data.sha256={{{NPZ_FILE}: '{checksums[NPZ_FILE]}'}}",
        "data.retries=1",
    )
    with pytest.raises(FetchError) as error:
        fetch(config)
    assert f"{url}/truncate/{NPZ_FILE}" in str(error.value)
    assert "gave up after 2 attempts" in str(error.value)
    assert requests[f"/truncate/{NPZ_FILE}"] == 2
    assert not RAW_DATA_DIR.exists()
    assert list(workdir.joinpath("data").iterdir()) == []


def test_server_error_is_retried(workdir, faulty_mirror, mirror):
    url, requests = faulty_mirror
    checksums = parse_checksums((mirror / "SHA256SUMS").read_text(), "SHA256SUMS")
    config = data_config(
        f"{url}/flaky",
        "data.sha256sums=null",
        f"data.sha256={{{NPZ_FILE}: '{checksums[NPZ_FILE]}'}}",
    )
    fetch(config)
    assert requests[f"/flaky/{NPZ_FILE}"] == 2
    assert (RAW_DATA_DIR / NPZ_FILE).read_bytes() == (mirror / NPZ_FILE).read_bytes()


def test_missing_file_fails_at_once_without_retrying(workdir, faulty_mirror):
    url, requests = faulty_mirror
    config = data_config(
        f"{url}/absent", "data.sha256sums=null", f"data.sha256={{{NPZ_FILE}: '{'a' * 64}'}}"
    )
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(config)
    assert requests[f"/absent/{NPZ_FILE}"] == 1


def test_timeout_is_reported(workdir, faulty_mirror):
    url, _requests = faulty_mirror
    config = data_config(
        f"{url}/slow",
        "data.sha256sums=null",
        f"data.sha256={{{NPZ_FILE}: '{'a' * 64}'}}",
        "data.retries=0",
        "data.timeout_seconds=0.5",
    )
    with pytest.raises(FetchError, match="timed out"):
        fetch(config)
    assert not RAW_DATA_DIR.exists()


def test_unreachable_server_is_reported_with_how_to_use_a_mirror(workdir, monkeypatch):
    """A new user without internet gets told about MNIST_MIRROR; a broken mirror does not."""
    config = data_config("http://127.0.0.1:9", "data.sha256sums=null", "data.retries=0")
    with pytest.raises(FetchError, match="cannot connect") as offline:
        fetch(config)
    assert "MNIST_MIRROR=/path/to/mnist make repro" in str(offline.value)
    assert "docs/offline.md: Offline, or behind a mirror" in str(offline.value)
    assert "## Offline, or behind a mirror" in (REPO_ROOT / "docs" / "offline.md").read_text()
    monkeypatch.setenv("MNIST_MIRROR", "http://127.0.0.1:9")
    with pytest.raises(FetchError, match="cannot connect") as broken_mirror:
        fetch(data_config("http://127.0.0.1:9", "data.retries=0"))
    assert "MNIST_MIRROR" not in str(broken_mirror.value)


def test_checksum_list_parsing():
    digest = "ab" * 32
    text = f"# comment\n{digest}  mnist.npz\n{digest.upper()} *other.gz\n"
    assert parse_checksums(text, "SUMS") == {"mnist.npz": digest, "other.gz": digest}
    with pytest.raises(FetchError, match="SUMS:1"):
        parse_checksums("not a checksum line\n", "SUMS")


def test_file_choice_follows_format_and_known_checksums():
    idx_only = {name: "0" * 64 for name in IDX_FILES.values()}
    assert choose_files("auto", {NPZ_FILE: "0" * 64, **idx_only}) == [NPZ_FILE]
    assert choose_files("auto", idx_only) == list(IDX_FILES.values())
    with pytest.raises(FetchError, match=r"no sha256 configured for mnist\.npz"):
        choose_files("npz", idx_only)
