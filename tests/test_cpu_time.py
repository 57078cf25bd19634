"""The suite's own CPU accounting (tests/cpu_time.py), on a suite of two tests in a subprocess."""

import re
import sys

from .conftest import REPO_ROOT, run, subprocess_env

TWO_TESTS = """
import subprocess, sys, time

BURN = "import time\\nwhile time.process_time() < 1.0: pass"


def test_burns_a_cpu_second_in_a_child():
    subprocess.run([sys.executable, "-c", BURN], check=True)


def test_sleeps_a_second():
    time.sleep(1.0)
"""


def test_cpu_top_counts_the_cpu_of_the_processes_a_test_waits_for_not_its_sleep(tmp_path):
    (tmp_path / "test_two.py").write_text(TWO_TESTS)
    command = [sys.executable, "-m", "pytest", "-p", "tests.cpu_time", "--cpu-top=2"]
    env = subprocess_env(PYTHONPATH=str(REPO_ROOT))
    result = run([*command, "-q", "-p", "no:cacheprovider", "test_two.py"], tmp_path, env)
    lines = re.findall(r"^\s*([\d.]+)s cpu  test_two.py::(\w+)$", result.stdout, re.MULTILINE)
    assert [name for _seconds, name in lines] == [
        "test_burns_a_cpu_second_in_a_child",
        "test_sleeps_a_second",
    ], result.stdout
    burned, slept = (float(seconds) for seconds, _name in lines)
    assert burned >= 1.0 and slept < 0.5, result.stdout
    assert re.search(r"the machine, busy: [\d.]+ CPU-minutes in [\d.]+ minutes", result.stdout)
