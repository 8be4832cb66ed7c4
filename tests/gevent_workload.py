"""Helper process for tests/test_worker_models.py: a gevent worker whose metric values cannot all be stored.

    python tests/gevent_workload.py DIR

Set up as Gunicorn does it: the master installs promfork's value store, forks
(the worker's value lock is made then, by the at-fork handler, before gevent
patches anything), and the worker patches with gevent, then creates the app's
metrics. Two greenlets update metrics while a new series finds no room (the
disk is full). Exit status 0 and ``["bound child", "new series"]`` on stdout
when both finish; a hang is cut after 2 s (faulthandler prints where, exit 1).
"""

import os
import sys

os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from promfork.writer import values  # after the env var, on purpose

assert values.install()

pid = os.fork()
if pid:
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))

from gevent import monkey  # noqa: E402

monkey.patch_all()  # as GeventWorker.init_process

import faulthandler  # noqa: E402
import json  # noqa: E402

import gevent  # noqa: E402
from prometheus_client import Counter  # noqa: E402

from promfork.directory import fileformat  # noqa: E402

faulthandler.dump_traceback_later(2, exit=True)
requests = Counter("requests", "Requests.", ["route"], registry=None)
hello = requests.labels("/hello")  # a bound child, as promfork's HTTP recorder keeps them
hello.inc()
slot = fileformat.ValueFile.slot


def no_room_for_new_series(self, key):
    if "/items" in key:
        raise OSError(28, "No space left on device")
    return slot(self, key)


fileformat.ValueFile.slot = no_room_for_new_series
finished = []


def new_series():
    requests.labels("/items").inc()  # held in memory: promfork starts its retry thread
    finished.append("new series")


def bound_child():
    hello.inc()
    finished.append("bound child")


gevent.joinall([gevent.spawn(new_series), gevent.spawn(bound_child)])
print(json.dumps(sorted(finished)))
