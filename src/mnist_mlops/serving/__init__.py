"""Serving the champion: the model server (`server`), its client, the container's health check,
and the HTTPS front door (`proxy`, nginx).

May import the ground, `config` and `tracking/`; loads no TensorFlow, DVC or Hydra.
"""
