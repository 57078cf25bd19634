"""mnist-mlops: the classic MNIST network as a tracked, reproducible DVC pipeline."""

__version__ = "0.1.0"
