"""Adapters for engines: a blocking, thread-safe facade and engines' plug-in APIs.

Nothing below this floor imports from here, and ``import lmtier`` does not load it: import the
module you need (``lmtier.integrations.blocking``, ``lmtier.integrations.sglang``).
"""
