"""The team's servers: MLflow on PostgreSQL with basic-auth and proxied artifacts (`server.py`),
and the object store those artifacts and the DVC remote live on (`object_store.py`, SeaweedFS).

May import the ground, `config` and `tracking/`; nothing imports it but the command line.
"""
