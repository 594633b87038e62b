"""The hooks a Tightwad plugin may implement.

Every ``register_*`` hook receives a ``register`` callback instead of returning
a list, so one plugin can register any number of things and the core records
which plugin registered what. pluggy has no async hooks: the factories that
plugins register build objects whose methods are async.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import click

hookspec = pluggy.HookspecMarker("tightwad")
hookimpl = pluggy.HookimplMarker("tightwad")

# --------------------------------------------------------------------------- #
# Serving: where tokens come from and how a request is answered
# --------------------------------------------------------------------------- #


@hookspec
def register_backends(register: Callable[..., None]) -> None:
    """Register model backends: ``register(name, factory)``.

    :param register: call as ``register(name: str, factory)`` where
        ``factory(config: BackendConfig, context: BackendContext) -> Backend``.
    """


@hookspec
def register_modes(register: Callable[..., None]) -> None:
    """Register serving modes: ``register(name, factory)``.

    :param register: call as ``register(name: str, factory)`` where
        ``factory(profile: Profile, backends: dict[str, Backend]) -> Mode``.
        A mode turns API requests into backend calls (``direct`` relays to the
        target; speculative modes draft and verify).
    """


@hookspec
def register_verifiers(register: Callable[..., None]) -> None:
    """Register speculative verifiers: ``register(name, factory)``.

    :param register: call as ``register(name: str, factory)``; the factory
        builds an object that checks draft tokens against a target.
    """


# --------------------------------------------------------------------------- #
# Cluster: where layers live and how bytes travel
# --------------------------------------------------------------------------- #


@hookspec
def register_placement_strategies(register: Callable[..., None]) -> None:
    """Register layer/expert placement strategies: ``register(name, factory)``.

    :param register: call as ``register(name: str, factory)``; the factory
        builds an object that assigns model tensors to devices.
    """


@hookspec
def register_transports(register: Callable[..., None]) -> None:
    """Register transports between nodes: ``register(name, factory)``.

    :param register: call as ``register(name: str, factory)``; the factory
        builds an object that opens byte streams to other nodes.
    """


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


@hookspec
def register_commands(register: Callable[["click.Command"], None]) -> None:
    """Register extra ``tightwad`` subcommands: ``register(command)``.

    :param register: call with a ``click.Command`` (or group); it is added to
        the top-level ``tightwad`` command under its own name.
    """
