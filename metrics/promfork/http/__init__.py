"""The request path every framework adapter shares.

recorder: metric names, labels, buckets and the one update per request; trace: the request's trace.
"""
