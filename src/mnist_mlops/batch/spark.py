"""The Spark engine: the registered model on Spark's executors, over a Parquet dataset.

The driver checks Java and the master first (a missing JVM or a master that
does not answer is one line in seconds, not a minute of retries), keeps
every socket on SPARK_LOCAL_IP (127.0.0.1 unless set), ships the version's
model folder once as an archive and this package as a zip, and scores with
`mapInArrow` through the same code as the local engine (executor.py).
MLflow's `spark_udf` takes the (-1, 28, 28) input only from an array column
and was 3× slower here than `mapInPandas` on the binary column; `mapInArrow`
skips pandas altogether.

The executors also tell invalid rows apart, with the local engine's checks,
in the same single pass; the result is cached and written in two parts,
the scored rows and `_rejected/`. The counts and the digit mix are read back
from the written files' metadata and `digit` column.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tarfile
import tempfile
import warnings
import zipfile
from functools import partial
from pathlib import Path

import numpy as np

from mnist_mlops.batch.cluster import java, read_or_make_secret, secret_file
from mnist_mlops.batch.formats import (
    ID,
    IMAGE,
    PROBABILITIES,
    REJECTED_DIR,
    BatchError,
)
from mnist_mlops.batch.local import Counts
from mnist_mlops.model.architectures import NUM_CLASSES

MODEL_ARCHIVE = "model.tar.gz"
LOG_CONFIG = Path(__file__).with_name("log4j2.properties")
PANDAS_WARNING = "PySpark does not yet fully support pandas"


def check_master(master: str) -> None:
    """A spark:// master must accept a connection within seconds; local[N] needs nothing."""
    if master.startswith("local"):
        return
    if not master.startswith("spark://"):
        raise BatchError(
            f"--master must be local[N], local[*] or spark://HOST:PORT, got {master!r}"
        )
    problems = []
    for address in master.removeprefix("spark://").split(","):
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except (OSError, ValueError) as error:
            problems.append(f"{address}: {error}")
    raise BatchError(f"no Spark master answers at {master} ({'; '.join(problems)})")


def start_session(master: str):
    """A SparkSession on `master`, every socket on SPARK_LOCAL_IP (default 127.0.0.1)."""
    java()
    check_master(master)
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise BatchError(
            "the spark engine needs pyspark: pip install -r requirements-spark.txt"
        ) from None
    address = os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    python = os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # pyspark 4.3 warns that it does not fully support pandas ≥ 3 on every
    # import; the scores were identical with pandas 2.3 and 3.1.
    warnings.filterwarnings("ignore", PANDAS_WARNING, FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", f"ignore:{PANDAS_WARNING}:FutureWarning")
    # The driver's JVM starts before the builder's settings are read: its log
    # configuration goes on spark-submit's command line.
    logging = f"-Dlog4j.configurationFile={LOG_CONFIG}"
    submit = f'--driver-java-options "{logging}" pyspark-shell'
    with tempfile.TemporaryDirectory(prefix="mnist-mlops-spark-") as private:
        if master.startswith("spark://"):
            # A standalone master of `mnist-mlops spark-cluster` talks only to
            # holders of its secret. The builder's settings end up on
            # spark-submit's command line, which every local user can read: the
            # secret goes in a 0600 properties file the JVM reads at its start.
            properties = Path(private) / "spark.properties"
            secret = read_or_make_secret(secret_file(), make=False)
            descriptor = os.open(properties, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(descriptor, "w") as stream:
                stream.write(f"spark.authenticate true\nspark.authenticate.secret {secret}\n")
            submit = f"--properties-file {properties} {submit}"
        os.environ["PYSPARK_SUBMIT_ARGS"] = submit
        session = (
            SparkSession.builder.master(master)
            .appName("mnist-mlops score")
            .config("spark.driver.host", address)
            .config("spark.driver.bindAddress", address)
            .config("spark.executor.extraJavaOptions", logging)
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.pyspark.python", python)
            .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
            .config("spark.sql.session.timeZone", "UTC")
            .getOrCreate()
        )
    session.sparkContext.setLogLevel("ERROR")
    return session


def ship(session, model_uri: str, staging: Path) -> Path:
    """Send the model's folder (as an archive) and this package (as a zip) to the executors.

    Returns the archive, made in a folder beside `staging`; executors find it
    by its name.
    """
    import mlflow

    import mnist_mlops

    scratch = Path(tempfile.mkdtemp(dir=staging.parent, prefix=f".{staging.name}.ship-"))
    model_dir = Path(
        mlflow.artifacts.download_artifacts(model_uri, dst_path=str(scratch / "model"))
    )
    archive = scratch / MODEL_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    package = Path(mnist_mlops.__file__).parent
    bundle = scratch / "mnist_mlops.zip"
    with zipfile.ZipFile(bundle, "w") as zipped:
        for path in sorted(package.rglob("*.py")):
            zipped.write(path, Path("mnist_mlops") / path.relative_to(package))
    context = session.sparkContext
    context.addArchive(str(archive))
    context.addPyFile(str(bundle))
    warm_up(session, archive.name)
    return archive


def warm_up(session, archive: str) -> None:
    """Start a Python worker per core and load the model in it, before the clock of the scoring.

    Part of the start-up, like the session: a job's first tasks otherwise pay
    for starting Python workers and loading the model inside the scoring.
    """
    from pyspark.sql import functions as F

    from mnist_mlops.batch import executor

    cores = session.sparkContext.defaultParallelism
    frame = session.range(cores, numPartitions=cores).select(F.col("id"))
    frame.mapInArrow(partial(executor.warm, archive), frame.schema).collect()


def arrow_schema(schema):
    """The Arrow schema Spark expects back from `mapInArrow` for a Spark schema."""
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(schema, timezone="UTC")


def output_type(id_type):
    from pyspark.sql import types as T

    return T.StructType(
        [
            T.StructField(ID, id_type),
            T.StructField("digit", T.ByteType()),
            *(T.StructField(name, T.DoubleType()) for name in PROBABILITIES),
            T.StructField("model_name", T.StringType()),
            T.StructField("model_version", T.StringType()),
            T.StructField("scored_at", T.TimestampType()),
        ]
    )


def score(session, shipped: Path, source: Path, staging: Path, batch_size: int, name, version):
    """Score `source` on the session's executors into `staging`; return the counts.

    `shipped` is the model archive that `ship` made; it is removed at the end.
    """
    from pyspark import StorageLevel
    from pyspark.errors import PySparkException
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from mnist_mlops.batch import executor

    session.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
    try:
        frame = session.read.parquet(str(source)).select(ID, IMAGE)
        schema = output_type(frame.schema[ID].dataType)
        with_reason = T.StructType([*schema.fields, T.StructField("reason", T.StringType())])
        scoring = partial(
            executor.score_batches, shipped.name, name, version, arrow_schema(with_reason)
        )
        # One pass over INPUT: the executors score the valid rows and give the others
        # a reason (the local engine's own checks), and the two parts are written
        # from the cached result.
        both = frame.mapInArrow(scoring, with_reason).persist(StorageLevel.MEMORY_AND_DISK)
        both.where(F.col("reason").isNull()).drop("reason").write.mode("append").parquet(
            str(staging)
        )
        rejected = both.where(F.col("reason").isNotNull()).select(ID, "reason")
        rejected.coalesce(1).write.mode("append").parquet(str(staging / REJECTED_DIR))
        both.unpersist()
    except PySparkException as error:
        raise BatchError(f"Spark could not score {source}: {_first_line(error)}") from None
    finally:
        shutil.rmtree(shipped.parent, ignore_errors=True)
    return counts_of(staging)


def counts_of(staging: Path) -> Counts:
    import pyarrow.dataset as ds

    scored = ds.dataset(staging, format="parquet")
    digits = scored.to_table(columns=["digit"]).column("digit").to_numpy()
    rejected = ds.dataset(staging / REJECTED_DIR, format="parquet").count_rows()
    return Counts(
        len(digits), rejected, np.bincount(digits.astype(np.int64), minlength=NUM_CLASSES)
    )


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
