"""Views, and a metric of the project's own."""

from django.http import JsonResponse
from prometheus_client import Counter

# In multiprocess mode a metric lives in this worker's file, not in a registry (registry=None);
# /metrics adds up every worker's, dead ones included.
ITEMS_VIEWED = Counter("example_items_viewed", "Item pages served.", registry=None)


def hello(request):
    return JsonResponse({"message": "hello"})


def read_item(request, item_id: int):
    ITEMS_VIEWED.inc()
    return JsonResponse({"item_id": item_id})
