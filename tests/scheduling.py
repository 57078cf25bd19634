"""How the suite is spread over the machine's cores (pytest-xdist, `--dist loadscope`).

Each module runs whole on one worker, so that its module-scoped fixtures (a
trained champion, a server, a PostgreSQL cluster) start once, as in a run on
one core. The slow tests (real MNIST) sit in modules of their own
(`*_real.py`, `test_tour.py`): they are the longest work there is, and none
waits behind the other tests of its wing.

The modules that take longest start first: the scheduler hands out the rest
as workers come free, so no worker is left with a long module at the end
while the others idle. The order comes from `--durations` (docs/tests.md); a
module missing from it only starts later, which costs time, never
correctness. (xdist's `loadgroup` would let a test choose its worker, but it
renames the test through an attribute pytest 9 no longer reads.)
"""

# Longest first, as measured with 3 workers on the reference machine (docs/tests.md).
LONGEST_FIRST = (
    # Runs the shared `dvc repro` on the real MNIST (tests/real_data.py), then the cnn.
    "tests/pipeline/test_pipeline_real.py",
    "tests/team/test_team.py",
    "tests/team/test_outages.py",
    "tests/team/test_s3_storage.py",
    "tests/test_containers.py",
    # After the shared run is done: these copy it.
    "tests/tuning/test_tune_real.py",
    "tests/pipeline/test_gate_real.py",
    # Its own clone and `make repro`, then the runbooks (about 6 minutes).
    "tests/test_tour.py",
    "tests/tuning/test_tune.py",
    "tests/pipeline/test_experiments.py",
    "tests/pipeline/test_distributed.py",
    "tests/pipeline/test_loop_real.py",
    "tests/batch/test_score.py",
    "tests/tracking/test_faults.py",
    "tests/pipeline/test_pipeline.py",
    "tests/tracking/test_ui.py",
    "tests/pipeline/test_distributed_real.py",
    "tests/serving/test_proxy.py",
    "tests/monitoring/test_monitor_real.py",
    "tests/pipeline/test_feedback.py",
    "tests/serving/test_observed.py",
    "tests/pipeline/test_train_evaluate.py",
    "tests/serving/test_serving.py",
    "tests/team/test_object_store.py",
    "tests/team/test_webhooks.py",
    "tests/team/test_inference_log_s3.py",
    "tests/monitoring/test_monitor.py",
    "tests/serving/test_hostile.py",
    "tests/serving/test_follow.py",
    "tests/monitoring/test_lineage.py",
    "tests/model/test_onnx.py",
    "tests/team/test_secrets.py",
    "tests/tracking/test_registry.py",
    "tests/test_hostile_files.py",
    "tests/monitoring/test_alerting.py",
    "tests/monitoring/test_snapshot.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {module: index for index, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
