"""Adapters for engines: a blocking, thread-safe facade and engines' plug-in APIs.

Each module is imported only on demand: the engines they talk to are optional and heavy, so
``import lmtier`` never pulls one in, and nothing below this floor imports from here.
"""
