"""The serving wing's commands: `serve` the champion, `predict` with it, `proxy`, `certs`.

`serve` imports only what the served model's environment holds
(requirements-serve.txt): no TensorFlow, DVC or Hydra.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mnist_mlops.monitoring.log_store import location
from mnist_mlops.paths import PARAMS_FILE, inference_log_dir, inference_spool_dir

CHAMPION_URI = "models:/mnist-classifier@champion"


def add_commands(commands: argparse._SubParsersAction) -> None:
    serving = commands.add_parser("serve", help="serve the champion model over HTTP")
    serving.add_argument("--model-uri", default=CHAMPION_URI, help="the registered model")
    serving.add_argument(
        "--host",
        default=os.environ.get("MNIST_SERVE_HOST", "127.0.0.1"),
        help="bind address (%(default)s; MNIST_SERVE_HOST sets the default)",
    )
    serving.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("MNIST_SERVE_PORT", "5000")),
        help="port (%(default)s; MNIST_SERVE_PORT sets the default)",
    )
    serving.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("MNIST_SERVE_WORKERS", len(os.sched_getaffinity(0)))),
        help="server processes on the port, each with its own copy of the model "
        "(%(default)s: one per core; MNIST_SERVE_WORKERS sets the default)",
    )
    serving.add_argument(
        "--no-metrics", action="store_true", help="serve no Prometheus metrics at /metrics"
    )
    serving.add_argument(
        "--access-log",
        action="store_true",
        help="print a line per request (off: /metrics and the inference log count them all)",
    )
    serving.add_argument(
        "--log-dir",
        type=location,
        default=inference_log_dir(),
        help="the inference log, shared by replicas: a folder, or s3://BUCKET/PREFIX on the "
        "team's object store for servers on many machines (%(default)s; "
        "MNIST_INFERENCE_LOG_DIR sets the default)",
    )
    serving.add_argument(
        "--log-spool",
        type=Path,
        default=inference_spool_dir(),
        help="with the log on an object store: the local folder its files wait in until the "
        "store has them (%(default)s; MNIST_INFERENCE_SPOOL_DIR sets the default)",
    )
    serving.add_argument(
        "--no-log", action="store_true", help="keep no inference log (and take no feedback)"
    )
    serving.add_argument(
        "--log-sample-rate", type=float, default=1.0, help="the share of requests logged"
    )
    serving.add_argument(
        "--no-log-pixels",
        action="store_true",
        help="log each image's features but not its pixels (they may be personal data)",
    )
    serving.add_argument(
        "--log-retention-hours",
        type=float,
        default=24 * 7,
        help="log files older than this are removed",
    )
    serving.add_argument(
        "--follow-seconds",
        type=float,
        default=30.0,
        help="for a models:/NAME@ALIAS URI, check the alias this often and swap a new version "
        "in without a restart (0: never)",
    )
    serving.add_argument(
        "--webhook-url",
        default="",
        help="following an alias on a tracking server, the URL it calls when the alias moves "
        "(default: http://HOST:PORT/hooks/mlflow, loopback for a wildcard HOST)",
    )
    serving.add_argument(
        "--no-webhook", action="store_true", help="register no webhook: look every period alone"
    )
    serving.set_defaults(run=serve)

    client = commands.add_parser("predict", help="classify digit images with the served model")
    client.add_argument("files", nargs="+", type=Path, metavar="IMAGE", help="PNG, JPEG, …")
    client.add_argument("--url", default="http://127.0.0.1:5000", help="the model server")
    client.add_argument(
        "--ca", type=Path, help="the CA that signed an https:// server's certificate"
    )
    client.set_defaults(run=predict)

    proxy = commands.add_parser(
        "proxy", help="HTTPS in front of the model server, the tracking server, or both (nginx)"
    )
    proxy.add_argument(
        "servers",
        nargs="?",
        default="model",
        choices=("model", "tracking", "both"),
        help="which servers to put behind it",
    )
    proxy.add_argument("--host", default="127.0.0.1", help="bind address")
    proxy.add_argument(
        "--server-name",
        default="",
        help="the name clients reach the proxy by, where plain HTTP is redirected (default: "
        "--host)",
    )
    proxy.add_argument(
        "--model-upstream",
        default="127.0.0.1:5000",
        help="the model server, or several replicas comma-separated (HOST:PORT,HOST:PORT)",
    )
    proxy.add_argument("--model-port", type=int, default=8443, help="HTTPS port for the model")
    proxy.add_argument("--tracking-upstream", default="127.0.0.1:5001", help="the tracking server")
    proxy.add_argument(
        "--tracking-port", type=int, default=8444, help="HTTPS port for the tracking server"
    )
    proxy.add_argument(
        "--certificate", type=Path, default=Path("deploy/certs/server.crt"), help="PEM"
    )
    proxy.add_argument("--key", type=Path, default=Path("deploy/certs/server.key"), help="PEM")
    proxy.add_argument("--rate", type=int, default=50, help="requests per second per client")
    proxy.add_argument("--burst", type=int, default=100, help="requests over the rate")
    proxy.add_argument(
        "--feedback-rate", type=int, default=10, help="feedback requests per second per client"
    )
    proxy.add_argument(
        "--tracking-max-body", default="5g", help="the tracking server's upload limit"
    )
    proxy.add_argument(
        "--replicas",
        type=int,
        default=0,
        metavar="N",
        help="also run N replicas of `mnist-mlops serve` here, on 127.0.0.1 from --replica-port "
        "on, as the model upstream (0: none)",
    )
    proxy.add_argument(
        "--replica-port", type=int, default=5000, help="the first replica's port (with --replicas)"
    )
    proxy.add_argument("--print-config", action="store_true", help="print nginx.conf and exit")
    proxy.add_argument("--params", type=Path, default=PARAMS_FILE, help=argparse.SUPPRESS)
    proxy.set_defaults(run=proxy_command)

    certificates = commands.add_parser(
        "certs", help="make a private CA and a certificate for 127.0.0.1 and localhost"
    )
    certificates.add_argument(
        "--directory", type=Path, default=Path("deploy/certs"), help="where to write them"
    )
    certificates.set_defaults(run=certs)


def serve(arguments: argparse.Namespace) -> int:
    from mnist_mlops.monitoring.inference_log import LogSettings
    from mnist_mlops.monitoring.log_store import store_of
    from mnist_mlops.monitoring.s3 import S3Error
    from mnist_mlops.serving.server import Observation
    from mnist_mlops.serving.server import serve as run_server
    from mnist_mlops.serving.webhook import hook_url as url_of_hook

    try:
        log = None
        if not arguments.no_log:
            log = LogSettings(
                directory=arguments.log_dir,
                sample_rate=arguments.log_sample_rate,
                pixels=not arguments.no_log_pixels,
                retention_hours=arguments.log_retention_hours,
                spool=arguments.log_spool,
            )
            if log.remote:  # keys are checked here; the store itself may be away for now
                store_of(log.directory)
    except (ValueError, S3Error) as error:
        print(f"mnist-mlops serve: {error}", file=sys.stderr)
        return 2
    if arguments.follow_seconds < 0:
        print("mnist-mlops serve: --follow-seconds must be 0 or more", file=sys.stderr)
        return 2
    if arguments.workers < 1:
        print("mnist-mlops serve: --workers must be 1 or more", file=sys.stderr)
        return 2
    observation = Observation(
        metrics=not arguments.no_metrics, log=log, access_log=arguments.access_log
    )
    where = (arguments.model_uri, arguments.host, arguments.port)
    hook_url = "" if arguments.no_webhook else arguments.webhook_url
    hook_url = hook_url or ("" if arguments.no_webhook else url_of_hook(*where[1:]))
    if arguments.workers > 1:
        from mnist_mlops.serving.workers import supervise

        return supervise(*where, observation, arguments.follow_seconds, arguments.workers, hook_url)
    return run_server(*where, observation, arguments.follow_seconds, hook_url)


def predict(arguments: argparse.Namespace) -> int:
    """Print the served model's digit and its probability for each image file."""
    from mnist_mlops.serving.client import ClientError, load_image
    from mnist_mlops.serving.client import predict as post

    files = arguments.files
    try:
        images = [load_image(path) for path in files]
    except ClientError as error:  # a file that is not a usable picture: bad input
        print(f"mnist-mlops predict: {error}", file=sys.stderr)
        return 2
    try:
        predictions = post(images, arguments.url, ca=arguments.ca)
    except ClientError as error:
        print(f"mnist-mlops predict: {error}", file=sys.stderr)
        return 1
    for path, prediction in zip(files, predictions, strict=True):
        digit = prediction["digit"]
        print(f"{path}: {digit} (probability {prediction['probabilities'][digit]:.3f})")
    return 0


def certs(arguments: argparse.Namespace) -> int:
    from mnist_mlops.serving.certs import make_certificates
    from mnist_mlops.serving.proxy import ProxyError

    try:
        for path in make_certificates(arguments.directory):
            print(path)
    except ProxyError as error:
        print(f"mnist-mlops certs: {error}", file=sys.stderr)
        return 1
    return 0


def proxy_command(arguments: argparse.Namespace) -> int:
    """The `proxy` command: build the settings from the arguments and params.yaml, then run."""
    from mnist_mlops.config import ConfigError, load_params
    from mnist_mlops.serving.proxy import ProxyError, ProxySettings, Upstream, render, run_proxy

    try:
        max_batch_size = load_params(arguments.params).serving.max_batch_size
    except ConfigError as error:
        print(f"mnist-mlops proxy: {error}", file=sys.stderr)
        return 2
    servers = arguments.servers
    upstreams = []
    replica_ports = [arguments.replica_port + index for index in range(arguments.replicas)]
    if replica_ports and servers == "tracking":
        print("mnist-mlops proxy: --replicas serve the model: model or both", file=sys.stderr)
        return 2
    if servers in ("model", "both"):
        model = ",".join(f"127.0.0.1:{port}" for port in replica_ports) or arguments.model_upstream
        upstreams.append(Upstream("model", model, arguments.model_port))
    if servers in ("tracking", "both"):
        upstreams.append(Upstream("tracking", arguments.tracking_upstream, arguments.tracking_port))
    settings = ProxySettings(
        upstreams=tuple(upstreams),
        certificate=arguments.certificate,
        key=arguments.key,
        host=arguments.host,
        server_name=arguments.server_name,
        max_batch_size=max_batch_size,
        rate=arguments.rate,
        burst=arguments.burst,
        feedback_rate=arguments.feedback_rate,
        tracking_max_body=arguments.tracking_max_body,
    )
    try:
        if arguments.print_config:
            print(render(settings))
            return 0
        return run_proxy(settings, replica_ports)
    except ProxyError as error:
        print(f"mnist-mlops proxy: {error}", file=sys.stderr)
        return 1
