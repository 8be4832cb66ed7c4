"""Exemplars for a user's own histograms: ``record(histogram, labelvalues, value)``.

The store itself (one file per process, the newest trace per bucket) is
promfork.writer.exemplars; this module is its public face.
"""

from promfork.writer.exemplars import record, record_child

__all__ = ["record", "record_child"]
