"""What runs on Spark's executors: the registered pyfunc, loaded once per Python worker.

The job ships the model's folder once as an archive (`SparkContext.addArchive`:
a standalone cluster refuses to ship a folder) and this package as a zip
(`addPyFile`), so an executor needs neither the registry nor the project
installed: only a Python with the model's requirements (mlflow-skinny,
onnxruntime, numpy, pandas) and pyarrow. An ONNX model is run from its file
without importing MLflow at all. It works on Arrow batches
(`mapInArrow`): the pixels are viewed in place, as in the local engine, and
no pandas conversion is paid. ONNX Runtime runs one thread per task, since
Spark already runs a task per core.
"""

from __future__ import annotations

from pathlib import Path

from mnist_mlops.batch.formats import ID, IMAGE, split_valid
from mnist_mlops.batch.local import answer, scored_table

_LOADED: dict[str, tuple] = {}


def load(archive: str) -> tuple:
    """(the pyfunc or None, a runtime or None) for the shipped model, once per Python worker.

    A model with an ONNX file is run straight from that file, at one thread:
    importing MLflow and loading the pyfunc cost each Python worker seconds
    and add nothing the file does not hold (the answers are equal, see the
    tests). Any other model is loaded as the pyfunc.
    """
    if archive not in _LOADED:
        from pyspark import SparkFiles

        folder = Path(SparkFiles.get(archive))
        runtime = one_thread_runtime(folder)
        model = None
        if runtime is None:
            import mlflow

            model = mlflow.pyfunc.load_model(str(folder))
        _LOADED[archive] = (model, runtime)
    return _LOADED[archive]


def one_thread_runtime(folder: Path):
    """The model's ONNX file in an ONNX Runtime session of one intra-op thread; None without."""
    onnx_files = list(folder.rglob("*.onnx"))
    if len(onnx_files) != 1:
        return None
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(onnx_files[0]), options, providers=["CPUExecutionProvider"]
    )
    (model_input,) = session.get_inputs()
    return lambda images: session.run(None, {model_input.name: images})[0]


def warm(archive: str, batches):
    """mapInArrow: load the model in this Python worker; the batches pass through."""
    load(archive)
    yield from batches


def score_batches(archive: str, name: str, version: str, schema, batches):
    """mapInArrow: batches of (id, image) in; out, batches of `schema`: each valid row scored
    with a null `reason`, each invalid one with its id and `reason` alone."""
    import pyarrow as pa

    model, runtime = load(archive)
    id_type = schema.field(ID).type
    for batch in batches:
        ids = batch.column(ID)
        valid, pixels, rejected = split_valid(ids, batch.column(IMAGE))
        digits, probabilities = answer(model, pixels, runtime=runtime)
        kept = ids if len(valid) == len(ids) else ids.take(valid)
        scored = scored_table(kept, digits, probabilities, name, version, id_type)
        scored = scored.append_column("reason", pa.nulls(len(valid), pa.string()))
        yield from scored.cast(schema).to_batches()
        if rejected:
            columns = {field.name: pa.nulls(len(rejected), field.type) for field in schema}
            columns[ID] = pa.array([row_id for row_id, _ in rejected], id_type)
            columns["reason"] = pa.array([reason for _, reason in rejected], pa.string())
            yield from pa.table(columns, schema=schema).to_batches()
