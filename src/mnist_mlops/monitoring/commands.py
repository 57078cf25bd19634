"""The monitoring wing's commands: `monitor` (one drift check), `feedback record` (true digits
from a CSV), `feedback snapshot` (labelled traffic as DVC-versioned data), `monitoring`
(Prometheus and Alertmanager in the foreground) and `lineage` (a request back to its data)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnist_mlops.paths import (
    FEEDBACK_SNAPSHOT_FILE,
    MONITORING_CONFIG_DIR,
    MONITORING_REPORTS_DIR,
    PARAMS_FILE,
    inference_log_dir,
)


def add_commands(commands: argparse._SubParsersAction) -> None:
    monitor = commands.add_parser(
        "monitor", help="check the served traffic of a model version against its reference"
    )
    monitor.add_argument(
        "--model-uri", default="models:/mnist-classifier@champion", help="the version to check"
    )
    monitor.add_argument("--since", default="", help="only rows this recent: 30m, 24h, 7d")
    monitor.add_argument("--last", type=int, default=0, help="only the last N rows")
    add_log_dir(monitor)
    monitor.add_argument(
        "--reports-dir", type=Path, default=MONITORING_REPORTS_DIR, help="where the report goes"
    )
    monitor.add_argument(
        "--min-rows", type=int, default=200, help="fewer rows than this: too few rows"
    )
    monitor.add_argument(
        "--alpha", type=float, default=0.05, help="the false-alarm rate of the whole check"
    )
    monitor.add_argument(
        "--min-effect",
        type=float,
        default=0.1,
        help="the smallest difference called drift (KS distance, digit-mix distance)",
    )
    monitor.add_argument(
        "--pushgateway", default="", help="push the verdict to this Prometheus Pushgateway"
    )
    monitor.set_defaults(run=run_monitor)

    feedback = commands.add_parser(
        "feedback", help="true digits: record them from a CSV, snapshot them as training data"
    )
    actions = feedback.add_subparsers(dest="action", metavar="ACTION", required=True)
    record = actions.add_parser(
        "record", help="record true digits from a CSV (request_id,position,digit)"
    )
    record.add_argument("labels", type=Path, metavar="CSV", help="the true digits")
    snapshot = actions.add_parser(
        "snapshot",
        help="write the served images that have true digits to data/feedback (dvc add)",
    )
    snapshot.add_argument(
        "--output",
        type=Path,
        default=FEEDBACK_SNAPSHOT_FILE,
        help="the snapshot, merged with what it already holds",
    )
    for action in (record, snapshot):
        add_log_dir(action)
    record.set_defaults(run=record_feedback)
    snapshot.set_defaults(run=snapshot_feedback)

    trace = commands.add_parser(
        "lineage",
        help="from a served request id, or a version (v3), back to its code and data",
        description="The version that answered a request (the server's X-Request-ID or the "
        "client's own id), its run, git commit, parameters and data digests, the gate's "
        "decision, the true digits sent back, and the champion's history around the answer; "
        "or the same for a registered version.",
    )
    trace.add_argument("target", metavar="REQUEST_ID|vN", help="a request id, or a version")
    trace.add_argument("--model", default="", help="the registered model, for a version")
    trace.add_argument("--json", action="store_true", help="one JSON object")
    add_log_dir(trace)
    trace.add_argument(
        "--snapshot", type=Path, default=FEEDBACK_SNAPSHOT_FILE, help="the feedback snapshot"
    )
    trace.add_argument("--params", type=Path, default=PARAMS_FILE, help=argparse.SUPPRESS)
    trace.set_defaults(run=lineage)

    watch = commands.add_parser(
        "monitoring", help="run Prometheus and Alertmanager on 127.0.0.1 for the model servers"
    )
    watch.add_argument(
        "--targets",
        default="127.0.0.1:5000",
        help="the model servers to scrape, host:port separated by commas",
    )
    watch.add_argument("--pushgateway", default="", help="a Pushgateway to scrape, host:port")
    watch.add_argument(
        "--webhook-url",
        default="http://127.0.0.1:9095/alerts",
        help="where Alertmanager sends the alerts",
    )
    watch.add_argument("--prometheus-port", type=int, default=9090, help="Prometheus' port")
    watch.add_argument("--alertmanager-port", type=int, default=9093, help="Alertmanager's port")
    watch.add_argument("--scrape-interval", default="15s", help="how often targets are scraped")
    watch.add_argument(
        "--evaluation-interval", default="15s", help="how often the rules are evaluated"
    )
    watch.add_argument(
        "--rules", type=Path, default=MONITORING_CONFIG_DIR / "rules.yml", help="the alert rules"
    )
    watch.add_argument(
        "--prometheus-config",
        type=Path,
        default=MONITORING_CONFIG_DIR / "prometheus.yml",
        help="Prometheus' configuration, before the options above are applied",
    )
    watch.add_argument(
        "--alertmanager-config",
        type=Path,
        default=MONITORING_CONFIG_DIR / "alertmanager.yml",
        help="Alertmanager's configuration, before --webhook-url is applied",
    )
    watch.set_defaults(run=monitoring)


def add_log_dir(parser: argparse.ArgumentParser) -> None:
    from mnist_mlops.monitoring.log_store import location

    parser.add_argument(
        "--log-dir",
        type=location,
        default=inference_log_dir(),
        help="the inference log: a folder or s3://BUCKET/PREFIX on the team's object store "
        "(%(default)s; MNIST_INFERENCE_LOG_DIR sets the default)",
    )


def record_feedback(arguments: argparse.Namespace) -> int:
    from mnist_mlops.monitoring.feedback import FeedbackError, read_labels, record
    from mnist_mlops.monitoring.log_store import unreadable

    try:
        rows = read_labels(arguments.labels)
    except FeedbackError as error:
        print(f"mnist-mlops feedback record: {error}", file=sys.stderr)
        return 2
    problem = unreadable(arguments.log_dir)
    if problem:
        print(f"mnist-mlops feedback record: {problem}", file=sys.stderr)
        return 2
    try:
        print(record(arguments.log_dir, rows))
    except OSError as error:  # the store went away: nothing recorded, the labels still there
        print(f"mnist-mlops feedback record: nothing recorded: {error}", file=sys.stderr)
        return 1
    return 0


def snapshot_feedback(arguments: argparse.Namespace) -> int:
    from mnist_mlops.monitoring.snapshot import SnapshotError, snapshot

    try:
        summary = snapshot(arguments.log_dir, arguments.output)
    except SnapshotError as error:
        print(f"mnist-mlops feedback snapshot: {error}", file=sys.stderr)
        return 1
    print(summary)
    if summary.rows:
        print(f"to pin it: git add {arguments.output}.dvc && git commit; then `dvc push`")
    return 0


def monitoring(arguments: argparse.Namespace) -> int:
    from mnist_mlops.monitoring.alerting import (
        MonitoringError,
        MonitoringSettings,
        password_file,
        run_monitoring,
    )

    settings = MonitoringSettings(
        targets=tuple(target.strip() for target in arguments.targets.split(",") if target.strip()),
        pushgateway=arguments.pushgateway,
        webhook_url=arguments.webhook_url,
        prometheus_port=arguments.prometheus_port,
        alertmanager_port=arguments.alertmanager_port,
        scrape_interval=arguments.scrape_interval,
        evaluation_interval=arguments.evaluation_interval,
        rules=arguments.rules,
        prometheus_config=arguments.prometheus_config,
        alertmanager_config=arguments.alertmanager_config,
        password_file=password_file(),
    )
    try:
        return run_monitoring(settings)
    except MonitoringError as error:
        print(f"mnist-mlops monitoring: {error}", file=sys.stderr)
        return 1


def run_monitor(arguments: argparse.Namespace) -> int:
    from mnist_mlops.monitoring.monitor import MonitorError, MonitorSettings
    from mnist_mlops.monitoring.monitor import run_monitor as check
    from mnist_mlops.tracking.store import report_store_failure

    if arguments.last < 0 or arguments.min_rows < 1 or not 0 < arguments.alpha < 1:
        print("mnist-mlops monitor: --last ≥ 0, --min-rows ≥ 1, 0 < --alpha < 1", file=sys.stderr)
        return 2
    settings = MonitorSettings(
        model_uri=arguments.model_uri,
        log_dir=arguments.log_dir,
        reports_dir=arguments.reports_dir,
        since=arguments.since,
        last=arguments.last,
        alpha=arguments.alpha,
        min_rows=arguments.min_rows,
        min_effect=arguments.min_effect,
        pushgateway=arguments.pushgateway,
    )
    try:
        status, line = check(settings)
    except MonitorError as error:
        print(f"mnist-mlops monitor: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        return report_store_failure("monitor", error, 2)
    print(line)
    return status


def lineage(arguments: argparse.Namespace) -> int:
    """Print where a request's answer, or a version, came from (monitoring/lineage.py)."""
    import json
    import re

    import mlflow
    from mlflow import MlflowClient

    from mnist_mlops.config import load_params
    from mnist_mlops.monitoring import lineage as trace
    from mnist_mlops.tracking import history
    from mnist_mlops.tracking.store import missing_store, tracking_uri

    if missing := missing_store():
        print(f"mnist-mlops lineage: {missing}", file=sys.stderr)
        return 1
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    version = re.fullmatch(r"v?(\d+)", arguments.target)
    try:
        if version:
            model = arguments.model or "mnist-classifier"
            if not arguments.model and arguments.params.exists():
                model = load_params(arguments.params).registry.model_name
            found = {"version": trace.version_lineage(client, model, version[1])}
        else:
            request = trace.find_request(arguments.log_dir, arguments.target)
            if request is None:
                raise trace.LineageError(
                    f"no request {arguments.target} in the inference log at {arguments.log_dir} "
                    "(a request is found there until the log's retention removes it)"
                )
            name, number = request["model_name"], request["model_version"]
            found = {
                "request": request,
                "feedback": trace.feedback_of(
                    arguments.log_dir, arguments.snapshot, request["request_id"], request["images"]
                ),
                "champion": trace.champion_around(
                    history.moves(client, name), request["answered_at_s"]
                ),
                "version": trace.version_lineage(client, name, number),
            }
    except trace.LineageError as error:
        print(f"mnist-mlops lineage: {error}", file=sys.stderr)
        return 1
    print(json.dumps(found, indent=2, sort_keys=True) if arguments.json else trace.render(found))
    return 0
