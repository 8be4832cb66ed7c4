"""A FastAPI service with promfork: HTTP metrics, an aggregated /metrics, and one metric of its own.

Run it under Gunicorn (see gunicorn.conf.py): ``gunicorn -c gunicorn.conf.py``, which uses
Gunicorn's native ASGI worker; ``-k uvicorn_worker.UvicornWorker`` works the same.
"""

from fastapi import FastAPI
from prometheus_client import Counter

from promfork.asgi import PrometheusMiddleware

# In multiprocess mode a metric lives in this worker's file, not in a registry (registry=None);
# /metrics adds up every worker's, dead ones included.
ITEMS_VIEWED = Counter("example_items_viewed", "Item pages served.", registry=None)

app = FastAPI()
app.add_middleware(PrometheusMiddleware)  # HTTP metrics and /metrics, settings from METRICS_*


@app.get("/hello")
async def hello() -> dict:
    return {"message": "hello"}


@app.get("/items/{item_id}")
async def read_item(item_id: int) -> dict:
    ITEMS_VIEWED.inc()
    return {"item_id": item_id}
