"""`gunicorn.install(globals())`: two lines wire every hook, chain the config's own, and name any that are missing."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest
from gunicorn.config import Config

from promfork import gunicorn
from promfork.master import hooks
from tests.support.client import scrape, value
from tests.support.servers import Gunicorn, wait_until

CHAINED = textwrap.dedent(
    """
    import os
    from promfork import gunicorn

    wsgi_app = "webapp.app:create_app()"
    MARKS = os.environ["TEST_MARKS"]

    def post_fork(server, worker):
        open(os.path.join(MARKS, f"post_fork-{worker.pid}"), "w").close()

    def child_exit(server, worker):
        open(os.path.join(MARKS, f"child_exit-{worker.pid}"), "w").close()

    def nworkers_changed(server, new_value, old_value):
        open(os.path.join(MARKS, f"nworkers-{new_value}"), "w").close()

    gunicorn.install(globals())
    """
)

BY_HAND = textwrap.dedent(
    """
    from promfork import gunicorn as hooks

    hooks.prepare_environment()
    wsgi_app = "webapp.app:create_app()"
    on_starting = hooks.on_starting
    when_ready = hooks.when_ready
    pre_fork = hooks.pre_fork
    post_fork = hooks.post_fork
    child_exit = hooks.child_exit
    """
)


def test_every_chained_hook_passes_gunicorns_own_arity_check(monkeypatch):
    monkeypatch.setattr(gunicorn, "prepare_environment", lambda: None)  # this process keeps its environment
    config: dict = {name: (lambda *args: None) for name in hooks.HOOKS}
    for name in ("post_fork", "nworkers_changed", "worker_abort"):
        config[name] = {"post_fork": lambda s, w: None, "nworkers_changed": lambda s, n, o: None}.get(
            name, lambda w: None
        )
    gunicorn.install(config)
    cfg = Config()
    for name in hooks.HOOKS:
        if name in cfg.settings:
            cfg.set(name, config[name])  # raises TypeError on a wrong arity
            assert config[name].promfork_hook == name
    assert hooks.missing_hooks(cfg) == []


def start(tmp_path: Path, config: str, **env: str) -> Gunicorn:
    path = tmp_path / "gunicorn.conf.py"
    path.write_text(config)
    server = Gunicorn(tmp_path, env=env, workers=2)
    server.argv[server.argv.index("gunicorn.conf.py")] = str(path)
    return server.start()


@pytest.mark.integration
def test_install_chains_the_configs_own_hooks_before_promforks(tmp_path: Path):
    marks = tmp_path / "marks"
    marks.mkdir()
    server = start(tmp_path, CHAINED, TEST_MARKS=str(marks))
    try:
        first = server.worker_pids()
        assert {f"post_fork-{pid}" for pid in first} <= {p.name for p in marks.iterdir()}
        assert {p.name for p in server.multiproc_dir.glob("[0-9]*.slot")} == {"0.slot", "1.slot"}  # promfork's

        os.kill(first[0], signal.SIGKILL)
        assert wait_until(lambda: (marks / f"child_exit-{first[0]}").exists(), 20)
        assert wait_until(lambda: value(scrape(server.port), "gunicorn_worker_exits_total", reason="signal") == 1, 20)

        server.proc.send_signal(signal.SIGTTIN)
        assert wait_until(lambda: (marks / "nworkers-3").exists(), 20)
        assert wait_until(lambda: value(scrape(server.port), "gunicorn_workers_configured") == 3, 20)
        assert "does not run promfork's" not in server.log()
    finally:
        server.stop()


@pytest.mark.integration
def test_a_config_wired_by_hand_names_each_hook_it_misses(tmp_path: Path):
    server = start(tmp_path, BY_HAND)
    try:
        log = server.log()
    finally:
        server.stop()
    missing = {line.split("promfork's ")[1].split(" hook")[0] for line in log.splitlines() if "does not run" in line}
    present = {"on_starting", "when_ready", "pre_fork", "post_fork", "child_exit"}
    assert missing == {name for name in hooks.HOOKS if name not in present}, log[-3000:]
    assert log.count("does not run promfork's worker_exit hook: no exit reasons normal and max_requests") == 1
