"""Watching the served model: image features, the inference log the model server writes and its
readers, true digits fed back, the reference profile, drift checks (`monitor`), and Prometheus
and Alertmanager (`alerting`).

May import the ground, `config` and `tracking/`; the model server (`serving/`) writes through it.
"""
