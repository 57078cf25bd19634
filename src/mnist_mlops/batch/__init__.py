"""Batch scoring: a whole Parquet dataset scored with exactly one registered version.

`mnist-mlops score` reads images in the batch format (formats.py), scores
them with the registered pyfunc, locally in pyarrow batches (local.py) or on
Apache Spark's executors (spark.py, executor.py), and writes the predictions
atomically, one MLflow run per job (jobs.py). `mnist-mlops batch-input`
makes the batch format from an `.npz` or a folder of images.

May import the ground, model, config, tracking, monitoring and serving (for
turning image files into MNIST digits); nothing imports it but `__main__`.
"""
