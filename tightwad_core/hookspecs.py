"""The hooks a Tightwad plugin may implement.

Every ``register_*`` hook receives a ``register`` callback instead of returning
a list, so one plugin can register any number of things and the core records
which plugin registered what. pluggy has no async hooks: the factories that
plugins register build objects whose methods are async.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from tightwad_core.roles import (
        BackendFactory,
        ModeFactory,
        PlacementFactory,
        TransportFactory,
        VerifierFactory,
    )

hookspec = pluggy.HookspecMarker("tightwad")
hookimpl = pluggy.HookimplMarker("tightwad")

# --------------------------------------------------------------------------- #
# Serving: where tokens come from and how a request is answered
# --------------------------------------------------------------------------- #


@hookspec
def register_backends(register: Callable[[str, BackendFactory], None]) -> None:
    """Register model backends: ``register(name, factory)``.

    :param register: call as ``register(name: str, factory)`` where
        ``factory(config: BackendConfig, context: BackendContext) -> Backend``
        (`roles.BackendFactory`).
    """


@hookspec
def register_modes(register: Callable[[str, ModeFactory], None]) -> None:
    """Register serving modes: ``register(name, factory)``.

    :param register: call as ``register(name: str, factory)`` where
        ``factory(profile, backends, context) -> Mode`` and ``factory.roles``
        names the backends it needs (`roles.ModeFactory`). A mode turns API
        requests into backend calls (``direct`` relays to the target;
        speculative modes draft and verify).
    """


@hookspec
def register_verifiers(register: Callable[[str, VerifierFactory], None]) -> None:
    """Register verifier rungs: ``register(name, factory)``.

    :param register: call as ``register(name: str, factory)`` where
        ``factory(target: Backend) -> Verifier`` and the factory carries
        ``rung``, ``rank``, ``requires``, ``pinnable`` and ``label``
        (`roles.VerifierFactory`). Speculative modes find rungs here.
    """


# --------------------------------------------------------------------------- #
# Cluster: where layers live and how bytes travel
# --------------------------------------------------------------------------- #


@hookspec
def register_placement_strategies(register: Callable[[str, PlacementFactory], None]) -> None:
    """Register layer/expert placement strategies: ``register(name, factory)``.

    :param register: call as ``register(name: str, factory)``; ``factory()``
        builds a `roles.PlacementStrategy` that assigns model tensors to devices.
    """


@hookspec
def register_transports(register: Callable[[str, TransportFactory], None]) -> None:
    """Register transports between nodes: ``register(name, factory)``.

    :param register: call as ``register(name: str, factory)``; ``factory()``
        builds a `roles.Transport` that opens byte streams to other nodes.
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
