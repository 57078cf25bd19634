"""What each test costs the machine: CPU seconds, beside the seconds `--durations` shows.

On a machine whose cores are full, a test's duration says more about the
others running beside it than about the test; its CPU time does not. Each
phase of a test (setup, call, teardown) records the CPU used by its xdist
worker and by the processes the worker waited for (servers stopped, stages
and `dvc` commands run; what they waited for in turn included), and
`--cpu-top N` prints the N tests that used the most, with the machine's own
total over the run (/proc/stat) for comparison. A module's servers count in
the teardown of the test after which they stop; a process that is never
waited for (one that detached itself) does not count.
"""

import os
import resource
import time

import pytest

_started: dict[str, float] = {}
_used: dict[str, float] = {}
_machine: list[float] = []


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-top",
        type=int,
        default=0,
        metavar="N",
        help="print the N tests that used the most CPU time (own and their processes')",
    )


def cpu_seconds() -> float:
    """CPU time of this process and of its waited-for descendants, user and system."""
    used = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(usage.ru_utime + usage.ru_stime for usage in used)


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (not idle or iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def pytest_sessionstart(session):
    _machine.append(machine_busy_seconds())
    _machine.append(time.monotonic())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    used = cpu_seconds() - _started.pop(item.nodeid, cpu_seconds())
    report.user_properties = [*report.user_properties, ("cpu_seconds", used)]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _started[item.nodeid] = cpu_seconds()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    _started[item.nodeid] = cpu_seconds()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    _started[item.nodeid] = cpu_seconds()


def pytest_runtest_logreport(report):
    """In the process that reports (xdist's controller): every phase's CPU, by test."""
    for name, value in report.user_properties:
        if name == "cpu_seconds":
            _used[report.nodeid] = _used.get(report.nodeid, 0.0) + value


def pytest_terminal_summary(terminalreporter, config):
    top = config.getoption("--cpu-top")
    if not top or not _used:
        return
    busy = machine_busy_seconds() - _machine[0]
    wall = time.monotonic() - _machine[1]
    write = terminalreporter.write_line
    terminalreporter.section(f"the {top} tests that used the most CPU")
    for nodeid, seconds in sorted(_used.items(), key=lambda entry: -entry[1])[:top]:
        write(f"{seconds:8.1f}s cpu  {nodeid}")
    counted = sum(_used.values())
    write(
        f"the tests: {counted / 60:.1f} CPU-minutes; the machine, busy: {busy / 60:.1f} "
        f"CPU-minutes in {wall / 60:.1f} minutes on {os.cpu_count()} cores"
    )
