"""The DVC pipeline, one module per stage (`fetch`, `preprocess`, `train`, `evaluate`) as dvc.yaml
names them, and what only the stages use (`figures`).

May import the ground, `model/`, `config` and `tracking/`.
"""
