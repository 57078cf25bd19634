"""Hyperparameter search: Optuna studies over a space of conf/search/ (`search`), their storage
(`studies`), each trial (`trial`) as a nested MLflow run (`study_runs`), and `tune` itself.

May import every wing above it in the order of `mnist_mlops.LAYERS`; trials train with `pipeline/`.
"""
