"""An Optuna storage that rides out a restart of its database.

Optuna's RDBStorage raises at the first failed query, and a worker whose
storage call fails dies, its trial left to the heartbeat check. Here every
storage call that fails because the database is unreachable (SQLAlchemy's
OperationalError, or a connection it had to drop) is tried again every second
for up to `outage_seconds` (`mnist-mlops tune --storage-outage`), and the
trial in progress simply waits. Only the outermost call retries, so a call
that makes others waits one bound, not several.

After an outage every trial's heartbeat is old. So that a worker whose trial is
alive is not judged dead by a peer that noticed the database back a moment
earlier, no trial is judged stale for one grace period after this process saw
an outage end, and a trial is judged stale only when it still is one grace
period after it was first seen so (a peer may have slept through the outage,
or its first call after it may be that check): a live trial's heartbeat
thread beats again within a heartbeat interval, a dead one's never does.

Left alone: a write whose commit reached the database just before the
connection broke is sent again. Optuna's writes of values and states are
idempotent or refused as such; a trial created twice that way would stay
RUNNING without a heartbeat.
"""

from __future__ import annotations

import functools
import sys
import threading
import time

RETRY_EVERY_SECONDS = 1.0
# RDBStorage's methods that reach the database (those _CachedStorage calls included).
DATABASE_METHODS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "_create_new_trial",
    "set_trial_param",
    "_set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "_get_trials",
    "get_best_trial",
    "_get_best_trial_id",
    "record_heartbeat",
)


class StorageAway(RuntimeError):
    """The storage stayed unreachable for longer than the bound."""


def unreachable(error: BaseException) -> bool:
    """Whether an error (or what caused it) says the database could not be reached."""
    import sqlalchemy.exc

    while error is not None:
        if isinstance(error, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
            return True
        if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
            return True
        error = error.__cause__ or error.__context__
    return False


def patient_storage_class(outage_seconds: float):
    """RDBStorage whose database calls wait out an outage of up to `outage_seconds`."""
    import optuna

    state = threading.local()
    outage = {"since": None, "ended": -float("inf")}
    lock = threading.Lock()

    def waiting(error: BaseException) -> None:
        with lock:
            now = time.monotonic()
            if outage["since"] is None:
                outage["since"] = now
                print(
                    f"tune: the Optuna storage is away ({type(error).__name__}); "
                    f"trials wait for it for up to {outage_seconds:g} s",
                    file=sys.stderr,
                    flush=True,
                )
            if now - outage["since"] >= outage_seconds:
                reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
                raise StorageAway(
                    f"the Optuna storage was away for more than {outage_seconds:g} s "
                    f"(--storage-outage): {reason}"
                ) from error
        time.sleep(RETRY_EVERY_SECONDS)

    def answered() -> None:
        with lock:
            if outage["since"] is not None:
                print(
                    f"tune: the Optuna storage is back after "
                    f"{time.monotonic() - outage['since']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                outage["since"] = None
                outage["ended"] = time.monotonic()

    def patient(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            if getattr(state, "inside", False):
                return method(self, *args, **kwargs)
            state.inside = True
            try:
                while True:
                    try:
                        result = method(self, *args, **kwargs)
                    except Exception as error:
                        if not unreachable(error):
                            raise
                        waiting(error)
                        continue
                    answered()
                    return result
            finally:
                state.inside = False

        return call

    class PatientRDBStorage(optuna.storages.RDBStorage):
        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            grace = self.grace_period or 0
            if time.monotonic() - outage["ended"] < grace:
                return []
            found = patient(optuna.storages.RDBStorage._get_stale_trial_ids)(self, study_id)
            # A trial is judged dead only when it is still stale a grace period after it
            # was first seen so. After an outage every heartbeat is old, also for a peer
            # that slept through it or whose first call after it is this one; a live
            # trial beats again within a heartbeat interval, a dead one never does.
            now, suspects = time.monotonic(), self.__dict__.setdefault("_suspects", {})
            for trial_id in set(suspects) - set(found):
                del suspects[trial_id]
            return [
                trial_id for trial_id in found if now - suspects.setdefault(trial_id, now) >= grace
            ]

    for name in DATABASE_METHODS:
        setattr(PatientRDBStorage, name, patient(getattr(optuna.storages.RDBStorage, name)))
    return PatientRDBStorage
