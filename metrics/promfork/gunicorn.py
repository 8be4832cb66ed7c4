"""promfork in a gunicorn.conf.py: two lines, as its last statement.

    from promfork import gunicorn
    gunicorn.install(globals())

``install`` exports PROMETHEUS_MULTIPROC_DIR (``prepare_environment``) and
assigns every promfork server hook into the config's namespace. A hook the file
defined earlier is kept and chained: the user's runs first, then promfork's,
with the same arguments (Gunicorn checks each hook's arity, so the chained one
has the same signature). A config that assigns promfork's hooks by hand and
misses some gets one line at start naming each missing hook and what is lost
without it. The hooks' bodies live in promfork.master.hooks.

Importing this module does not import prometheus_client (a test checks it): the
config file is read before PROMETHEUS_MULTIPROC_DIR is set.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

from promfork.master import hooks
from promfork.master.hooks import (
    EXIT_REASONS,
    child_exit,
    dirty_worker_exit,
    nworkers_changed,
    on_dirty_starting,
    on_exit,
    on_reload,
    on_starting,
    post_fork,
    pre_fork,
    prepare_environment,
    when_ready,
    worker_abort,
    worker_exit,
)


def install(config: MutableMapping[str, object]) -> None:
    """Prepare the environment and assign every promfork hook in `config` (a gunicorn.conf.py's ``globals()``)."""
    prepare_environment()
    for name, hook in hooks.HOOKS.items():
        own = config.get(name)
        if own is None or getattr(own, "promfork_hook", None) == name:
            config[name] = hook
        elif not callable(own):
            raise TypeError(f"gunicorn.conf.py: {name} = {own!r} is not callable; promfork cannot chain it")
        else:
            config[name] = _chain(name, own, hook)


def _chain(name: str, first: Callable, then: Callable) -> Callable:
    """`first`, then `then`, as one hook of the same arity (Gunicorn counts a hook's positional parameters)."""
    arity = then.__code__.co_argcount
    if arity == 1:

        def chained(a):
            first(a)
            then(a)

    elif arity == 2:

        def chained(a, b):
            first(a, b)
            then(a, b)

    else:

        def chained(a, b, c):
            first(a, b, c)
            then(a, b, c)

    chained.__name__ = chained.__qualname__ = name
    chained.__doc__ = f"{getattr(first, '__qualname__', first)!s}, then promfork's {name}."
    chained.promfork_hook = name
    return chained


__all__ = [
    "EXIT_REASONS",
    "child_exit",
    "dirty_worker_exit",
    "install",
    "nworkers_changed",
    "on_dirty_starting",
    "on_exit",
    "on_reload",
    "on_starting",
    "post_fork",
    "pre_fork",
    "prepare_environment",
    "when_ready",
    "worker_abort",
    "worker_exit",
]
