"""The roles plugins fill, as Protocols, and the factories the hooks register.
The core only ever talks to these.

A backend declares what it offers in ``capabilities``, so modes and verifier
rungs can pick what fits without knowing backend names. The names in use:

- ``"tokens"``: ``tokenize``/``detokenize``/``apply_template``, token-id
  prompts, ``vocab()`` and ``complete_ids()`` (see `TokenBackend`);
- ``"llama-completion"``: llama-server's ``/completion`` (several prompts in
  one request, per-token probabilities);
- ``"tightwad-verify"``: the worker's one-request-per-round verify protocol;
- ``"prompt-logprobs"``: ``/v1/completions`` with ``echo`` and ``logprobs``
  for prompt positions;
- ``"rpc-pool"`` (`POOL_CAPABILITY`): the backend launches an engine that can
  be placed on a profile's ``[cluster]`` pool (``BackendContext.pool``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import trio

from tightwad_core.bench.link import LinkSpec
from tightwad_core.config.profiles import BackendConfig, Profile
from tightwad_core.config.schema import RpcWorkerConfig
from tightwad_core.records import Delta, GenRequest, Health, Result, TokenRun
from tightwad_core.spec.interfaces import Verifier
from tightwad_core.vocab import Vocab

if TYPE_CHECKING:
    from tightwad_core.cluster.pool import RpcPool
    from tightwad_core.moe.plan import ExpertProblem


POOL_CAPABILITY = "rpc-pool"
#: The role a mode lists to be handed the profile's ``drafters`` fleet: its
#: backends arrive as ``"drafters.0"``, ``"drafters.1"``, ... in profile order.
FLEET = "drafters"


def fleet(backends: Mapping[str, Backend]) -> list[Backend]:
    """The fleet's backends, in the profile's order."""
    found = [(int(k.split(".", 1)[1]), b) for k, b in backends.items() if k.startswith(FLEET + ".")]
    return [b for _, b in sorted(found, key=lambda kb: kb[0])]


@dataclass(frozen=True)
class BackendContext:
    """What a backend factory gets besides its own config."""

    role: str  # "target", "draft" or "drafters.N"
    config_dir: Path  # folder of the config file (relative model paths start here)
    run_dir: Path  # where a launched server may write logs
    extra: dict[str, Any] = field(default_factory=dict)
    pool: RpcPool | None = None  # the target's rpc-server pool, when the profile has a [cluster]


@runtime_checkable
class Backend(Protocol):
    """A model server: launched and supervised by us, or reached at a URL."""

    @property
    def kind(self) -> str:
        """The plugin name, e.g. ``"llama-server"``."""

    @property
    def role(self) -> str:
        """``"target"`` or ``"draft"``."""

    @property
    def passthrough(self) -> frozenset[str] | None:
        """Parameters beyond the common ones that this backend can pass on
        (``None``: any OpenAI parameter is passed on unchanged)."""

    @property
    def capabilities(self) -> frozenset[str]:
        """What this backend offers (see the module docstring)."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run for the proxy's lifetime: launch/supervise or watch the server.
        Calls ``task_status.started()`` once requests may be sent."""

    async def health(self) -> Health: ...

    async def model_name(self) -> str:
        """The model's name as the upstream server reports it."""

    async def model_info(self) -> dict[str, Any]:
        """Facts for `/api/show` and `/api/tags`; any of these keys may be present:
        ``name``, ``chat_template``, ``context_length``, ``parameters``, ``size``."""

    def check(self, req: GenRequest) -> None:
        """Raise `UnsupportedParam` for parameters this backend cannot honour."""

    async def generate(self, req: GenRequest) -> Result: ...

    def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        """An async generator of deltas; close it (``aclosing``) to cancel upstream."""

    async def aclose(self) -> None: ...


@runtime_checkable
class TokenBackend(Backend, Protocol):
    """A backend with the ``"tokens"`` capability: it speaks token ids."""

    async def tokenize(self, text: str, add_special: bool = False) -> list[int]: ...

    async def detokenize(self, tokens: list[int]) -> str: ...

    async def apply_template(self, messages: list[dict[str, Any]],
                             tools: list[dict[str, Any]] | None = None) -> str:
        """The model's own chat template applied (with its tools section when
        ``tools`` are given), with the generation prompt."""

    async def vocab(self) -> Vocab | None:
        """The model's vocabulary, when this backend can learn it (else None)."""

    async def complete_ids(self, prompt: list[int], max_tokens: int, *, gaps: bool = False) -> TokenRun:
        """Greedy generation from token ids; with ``gaps``, the top-2 log-probability
        gap at each generated position (the bench's reference runs)."""


class Mode(Protocol):
    """Turns API requests into backend calls."""

    @property
    def name(self) -> str: ...

    async def start(self) -> None:
        """Called once the backends are up, before the first request."""

    def check(self, req: GenRequest) -> None:
        """Raise `UnsupportedParam` for parameters this mode cannot honour."""

    async def generate(self, req: GenRequest) -> Result: ...

    def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]: ...

    def status(self) -> dict[str, Any]:
        """For `/v1/tightwad/status`: at least ``mode``; speculative modes add
        ``verifier`` (``rung``, ``label``, ``exact``, ``speedup``) and counters."""


class PlacementStrategy(Protocol):
    """Assigns model tensors (layers or experts) to the devices of a cluster."""

    name: str

    def assign(self, tensors: Mapping[str, int], devices: Mapping[str, int]) -> dict[str, str]:
        """Tensor name -> device name, given tensor sizes and the memory each
        device offers (bytes, in device order). Raises ValueError (one line
        for the user) when the tensors do not fit."""


class ExpertPlacement(Protocol):
    """Assigns a MoE model's fused expert tensors to devices (`tightwad moe
    plan`, a cluster's ``experts``), for llama.cpp's ``--override-tensor``.
    Registered through ``register_placement_strategies`` like the layer
    strategies and told apart from them by ``place_experts``."""

    name: str
    rank: int  # "auto" takes the lowest rank whose needs the inputs meet
    needs_profile: bool  # plans only with a routing profile

    def place_experts(self, problem: ExpertProblem) -> dict[str, str]:
        """Tensor name -> device name for every tensor of every projection in
        ``problem.model`` (a projection's weight and bias on one device), none
        beyond a device's memory. Raises `tightwad_core.moe.plan.PlanError`
        (one line for the user) when they do not fit."""


class Transport(Protocol):
    """How the coordinator reaches one rpc-server of a cluster's pool. The
    pool relays llama.cpp's RPC connections through ``connect`` (counting
    bytes and round trips, and noticing which worker dropped)."""

    name: str
    link: LinkSpec  # delay and bandwidth cap the relay adds (zero unless emulating a link)

    def describe(self) -> str:
        """One line for status and logs, e.g. ``"tls-token to 10.0.0.5:50052"``."""

    async def connect(self) -> trio.abc.Stream:
        """A byte stream to the worker's rpc-server; `RpcError` (naming the
        worker and what to do) when it cannot be opened."""


# --------------------------------------------------------------------------- factories


class BackendFactory(Protocol):
    def __call__(self, config: BackendConfig, context: BackendContext, /) -> Backend: ...


class VerifierFactory(Protocol):
    """A verifier rung: built for one target backend."""

    rung: str  # the name profiles use in `speculation.verifier`
    rank: int  # place on the ladder: "auto" takes the lowest rank the target supports
    requires: str  # the backend capability the rung needs
    #: Whether a profile may pin this rung on a target that does not declare
    #: ``requires`` (a capability servers cannot announce, e.g. prompt logprobs).
    pinnable: bool
    label: str  # one honest line for logs, status and /v1/models

    def __call__(self, target: Backend, /) -> Verifier: ...


@dataclass(frozen=True)
class ModeContext:
    """What a mode factory gets besides the profile and its backends."""

    verifiers: Mapping[str, VerifierFactory]  # the registered rungs, by name


class ModeFactory(Protocol):
    roles: tuple[str, ...]  # the backends the mode needs started, e.g. ("target", "draft")

    def __call__(self, profile: Profile, backends: Mapping[str, Backend],
                 context: ModeContext, /) -> Mode: ...


class PlacementFactory(Protocol):
    def __call__(self) -> PlacementStrategy | ExpertPlacement: ...


class TransportFactory(Protocol):
    def __call__(self, worker: RpcWorkerConfig, /) -> Transport: ...


def best_verifier(verifiers: Mapping[str, VerifierFactory],
                  capabilities: frozenset[str]) -> VerifierFactory | None:
    """The highest rung of the ladder that a target with ``capabilities`` supports."""
    fits: Sequence[VerifierFactory] = [v for v in verifiers.values() if v.requires in capabilities]
    return min(fits, key=lambda v: v.rank) if fits else None


__all__ = ["Backend", "BackendConfig", "BackendContext", "BackendFactory", "Mode", "ModeContext",
           "ModeFactory", "ExpertPlacement", "PlacementFactory", "PlacementStrategy", "Profile",
           "TokenBackend", "Transport", "TransportFactory", "VerifierFactory", "best_verifier",
           "FLEET", "POOL_CAPABILITY", "fleet"]
