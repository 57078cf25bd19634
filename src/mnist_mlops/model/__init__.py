"""The model: its architectures (the Keras builders that conf/model/ and conf/optimizer/ choose),
the ONNX export and its check, the servable classifier, and how each is logged to MLflow.

May import nothing else of the project: `config` and every wing stand on it.
"""
