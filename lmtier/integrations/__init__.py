"""Adapters to real engines' plug-in APIs; each module is imported only on demand.

Nothing below this package imports it: the engines these modules talk to are optional and
heavy, so ``import lmtier`` never pulls one in.
"""
