"""The request path every framework adapter shares.

recorder: metric names, labels and buckets, and the one update per request.
"""
