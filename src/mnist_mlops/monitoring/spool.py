"""The spool of a log on an object store: files wait in a local folder until the store has them.

The server's log writer writes into the spool exactly as into a local log;
a thread of its own (`Shipper`) copies each complete file to the store
under the same name and removes it from the spool only once the store has
answered the PUT. So the request path never waits on the store, and a store
that is away (restarting, unreachable, refusing) loses nothing: the files
stay, the shipper tries again (after 0.5, 1, 2, 4, then every 5 s), and the
writer drops and counts new rows only once the spool holds `spool_bytes`.

Any process writing into one spool ships every file in it, its own and
those a stopped process left: a PUT of the same name and bytes twice is
harmless, and a part shipped again after its writer merged it is covered
by the segment (log_files.log_files).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mnist_mlops.monitoring.log_files import all_log_files
from mnist_mlops.monitoring.log_store import FolderStore, S3Store

IDLE_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 5.0
TIDY_SECONDS = 10.0


class Shipper:
    """Copies the spool's files to the store, oldest first; tidies the store while it answers."""

    def __init__(
        self,
        spool: FolderStore,
        store: S3Store,
        tidy: Callable[[], None],
        warn: Callable[[str], None],
        counted: tuple[Callable[[int], None], Callable[[int], None]] = (
            lambda files: None,
            lambda passes: None,
        ),
    ) -> None:
        """`counted`: told of each file shipped, and of each pass the store refused."""
        self.spool, self.store, self.tidy, self.warn = spool, store, tidy, warn
        spool.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.on_shipped, self.on_failed = counted
        self._backlog = sum(file.size for file, _ in all_log_files(spool))
        self._last_tidy = time.monotonic()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-log-ship", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def backlog(self) -> int:
        """Bytes the spool held at the end of the last pass."""
        return self._backlog

    def ship(self) -> bool:
        """One pass over the spool; False when the store refused (what is left stays)."""
        files = sorted((file for file, _ in all_log_files(self.spool)), key=lambda f: f.mtime)
        left = sum(file.size for file in files)
        try:
            for file in files:
                try:
                    data = file.read()
                except FileNotFoundError:  # another process of this spool shipped it
                    left -= file.size
                    continue
                self.store.write(file.name, data)
                self.spool.remove(file.name)
                self.on_shipped(1)
                left -= file.size
        except OSError as error:
            self.on_failed(1)
            self.warn(f"cannot ship the log to {self.store} ({error}); kept in {self.spool}")
            return False
        finally:
            self._backlog = left
        return True

    def _run(self) -> None:
        failed = 0
        while not self._stop.is_set():
            self._wake.wait(IDLE_SECONDS)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self.ship():
                failed += 1
                self._stop.wait(min(MAX_BACKOFF_SECONDS, 0.25 * 2**failed))
                continue
            failed = 0
            if time.monotonic() - self._last_tidy >= TIDY_SECONDS:
                self._last_tidy = time.monotonic()
                self.tidy()

    def close(self, timeout: float) -> None:
        """Stop the thread, then a last pass; what the store refuses waits for the next start."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.ship()
