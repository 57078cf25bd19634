"""MLflow tracking: the store (`store`), how a run starts, ends and records its provenance (`runs`),
the registry and its promotion gate (`registry`), the leaderboard and the UI.

May import the ground, `model/` and `config`; never the wings that use it.
"""
