"""The team's tracking server: MLflow on PostgreSQL with basic-auth and proxied artifacts.

May import the ground, `config` and `tracking/`; nothing imports it but the command line.
"""
