"""Runs in every process that records metrics.

values: the value store (where an increment is stored); unrolled: its generated update
functions; exemplars: the exemplar store.
"""
