"""How the suite is spread over the machine's cores (pytest-xdist, `--dist loadgroup`).

Each module runs whole on one worker, so that its module-scoped fixtures (a
trained champion, a server, a PostgreSQL cluster) start once, as in a run on
one core. A slow test (real MNIST) is a group of its own: it uses no module
fixture, and it is the longest work there is. A test that must share a worker
with another module's tests names the group itself
(`@pytest.mark.xdist_group("name")`).

The groups that take longest start first: the scheduler hands out the rest as
workers come free, so no worker is left with a long group at the end while
the others idle. The order comes from `--durations` (docs/tests.md); a group
missing from it only starts later, which costs time, never correctness.
"""

import pytest

# Longest first, as measured with 3 workers on the reference machine (docs/tests.md).
LONGEST_FIRST = (
    "tests/pipeline/test_pipeline.py::test_real_mnist_reaches_the_target_accuracies",
    "tests/team/test_team.py",
    "tests/team/test_outages.py",
    "tests/team/test_s3_storage.py",
    "tests/test_containers.py",
    "tests/tuning/test_tune.py",
    "tests/tuning/test_tune.py::test_a_real_study_beats_the_default_and_its_preset_becomes_champion",
    "tests/pipeline/test_experiments.py",
    "tests/pipeline/test_distributed.py",
    "tests/batch/test_score.py",
    "tests/tracking/test_faults.py",
    "tests/pipeline/test_loop_real.py::test_retraining_on_feedback_brings_the_accuracy_back",
    "tests/pipeline/test_pipeline.py",
    "tests/tracking/test_ui.py",
    "tests/test_tour.py::test_the_readme_tour_runs_verbatim_with_nothing_activated",
    "tests/pipeline/test_distributed.py::test_two_processes_on_real_mnist_reach_the_seed_accuracy",
    "tests/serving/test_proxy.py",
    "tests/pipeline/test_feedback.py",
    "tests/serving/test_observed.py",
    "tests/monitoring/test_monitor_real.py::test_the_monitor_tells_drift_from_clean_digits",
    "tests/pipeline/test_train_evaluate.py",
    "tests/serving/test_serving.py",
    "tests/team/test_object_store.py",
    "tests/monitoring/test_monitor.py",
)


def group_of(item: pytest.Item) -> str:
    marker = item.get_closest_marker("xdist_group")
    if marker is not None:
        return marker.args[0] if marker.args else marker.kwargs["name"]
    if item.get_closest_marker("slow") is not None:
        return item.nodeid
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group_of(item)))
    rank = {group: index for index, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group_of(item), len(rank)))
