"""The profile schema: what a profile table may hold, with a comment per
field (docs/config.md is checked against these)."""

from __future__ import annotations

from typing import Any

import msgspec


class ConfigError(Exception):
    """A config file that cannot be used; the message is one line for the user."""


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One model server the proxy talks to (a target or a draft)."""

    backend: str  # plugin name: "llama-server", "openai", "ollama", ...
    url: str | None = None  # connect to a server already running at this base URL
    model_path: str | None = None  # GGUF to launch ("@name" = built-in model from `tightwad setup`)
    model: str | None = None  # model name to ask the upstream server for (openai/ollama)
    api_key: str | None = None  # bearer token for the upstream server
    api_key_env: str | None = None  # ...or the environment variable that holds it
    ctx_size: int = 4096  # context length of each slot of a launched server
    parallel: int = 2  # slots of a launched llama-server, sequences of a launched worker
    threads: int | None = None  # CPU threads of a launched server (default: the engine's)
    extra_args: list[str] = []  # further command-line arguments for a launched server
    startup_timeout: float = 180.0  # seconds to wait for a launched server to become healthy
    request_timeout: float = 600.0  # seconds before an upstream request is abandoned
    restart: bool = True  # restart a launched server that dies


class SpeculationConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How the speculative mode drafts and verifies."""

    max_draft_tokens: int | str = "auto"  # K draft tokens per round, or "auto" to pick K (0 = relay) by measurement
    k_max: int = 12  # largest K that "auto" tries
    verifier: str = "auto"  # a registered rung (worker, prompt-logprobs, prefix-batch, generate-compare, ...); auto = the best the target offers
    fallback_on_draft_failure: bool = True  # a failing or slow draft lets the request go on with the target alone
    draft_timeout: float = 5.0  # seconds one proposal may take before the round goes on without it
    overlap_draft: bool = False  # draft the next round while the target verifies this one (exact; pays when verify waits on a network)
    consensus: str = "strict"  # with several `drafters`: "strict" (all agree), "majority" or "any_disagree" (every branch verified as a tree)
    consensus_wait: float = 0.5  # seconds a round waits for the other drafters after the first answers (later ones are left out of that round)


class GateConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How the `gate` mode has drafters write answers and the target review them."""

    pick: str = "round-robin"  # which drafter writes a response: "round-robin" or "least-busy"
    review: str = "scores"  # "scores": the target scores the draft in one pass; "judge": the target is asked in a prompt (chat-only targets)
    threshold: float = 2.0  # log-probability margin (nats) by which the target's own choice must beat a draft token for a real disagreement
    min_prefix: float = 0.25  # a draft agreed for less than this share of its tokens is rejected (a fresh target answer); otherwise corrected
    fail_open: bool = False  # a failed review passes the unreviewed draft (labelled) instead of failing the request
    cache_entries: int = 256  # reviewed answers kept for identical greedy requests (0: no cache)
    draft_timeout: float = 120.0  # seconds a drafter may take to write a whole response before the next one is tried


class RpcWorkerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One rpc-server of a cluster's pool."""

    name: str  # shown in status, logs and errors
    host: str = "127.0.0.1"  # the machine's address
    port: int = 50052  # its rpc-server's port, or the port of its `tightwad rpc-worker` tunnel (0 with launch: any free port)
    transport: str = "tcp"  # plugin: "tcp" (loopback or a trusted network), "tls-token" (`tightwad rpc-worker`), "emulated" (a slow link, for test beds)
    memory: str | None = None  # memory the model may use there, e.g. "10GiB" (default: what the server reports free)
    fingerprint: str | None = None  # tls-token: SHA-256 of the worker's certificate, as `tightwad rpc-worker` prints it
    token: str | None = None  # tls-token: the worker's token
    token_env: str | None = None  # ...or the environment variable that holds it
    delay: str = "0ms"  # emulated: one-way delay of the link
    bandwidth: str | None = None  # emulated: bandwidth cap per direction, e.g. "100mbit"
    launch: bool = False  # start an rpc-server on this machine for it (test beds; host must be loopback)
    threads: int | None = None  # launch: CPU threads of that rpc-server
    extra_args: list[str] = []  # launch: further rpc-server arguments, e.g. ["-d", "CUDA0"]
    env: dict[str, str] = {}  # launch: environment of that rpc-server, e.g. {CUDA_VISIBLE_DEVICES = "1"}
    speed: float = 1.0  # relative speed of its devices for `cluster.experts` (1.0 reads expert weights twice as fast as 0.5)
    agent: str | None = None  # URL of the machine's peer agent (`tightwad peer start`), e.g. "http://10.0.0.5:9191": `tightwad status` shows its version
    agent_token_env: str | None = None  # the environment variable holding that agent's token


class ClusterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A pool of rpc-servers the target's layers are placed on."""

    workers: list[RpcWorkerConfig] = []  # the pool, in device order
    placement: str = "memory-proportional"  # placement-strategy plugin that splits the layers over the workers
    output_local: bool = True  # keep the output layer on the target's own machine (hidden states cross the network, not float32 logits)
    connect_timeout: float = 5.0  # seconds a worker has to answer the RPC handshake
    rejoin_timeout: float = 600.0  # after a worker drops: seconds to wait for it to come back before giving up
    experts: str | None = None  # expert placement strategy for a MoE target ("balanced", "profile-guided", "auto"); unset: a layer's experts stay with their layer
    routing_profile: str | None = None  # routing profile (tightwad-moe-routing JSON) the expert placement uses; "profile-guided" needs one
    expert_cpu: str | None = None  # MEMORY[@SPEED] of the coordinator's CPU offered to experts, e.g. "24GiB@0.3" (unset: experts stay on the pool)


class Profile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One way of running the proxy."""

    extends: str | None = None  # name of a profile whose settings this one starts from
    description: str = ""  # one line shown by `tightwad config check`
    mode: str = "direct"  # serving mode plugin: "direct" relays to the target
    listen: str = "127.0.0.1:8088"  # host:port the proxy listens on
    api_key: str | None = None  # bearer token clients must send (required off loopback)
    api_key_env: str | None = None  # ...or the environment variable that holds it
    allowed_hosts: list[str] = []  # Host names served without a token besides localhost and loopback addresses ("*": any)
    allowed_origins: list[str] = []  # web-page origins (scheme://host:port) allowed to call the proxy from a browser ("*": any)
    served_model: str | None = None  # model name clients see (default: the target's)
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    max_body_bytes: int = 1_048_576  # largest request body accepted
    passthrough: list[str] = []  # request parameters beyond the OpenAI ones passed on to the backend (e.g. "grammar")
    truncate: str = "error"  # a chat longer than the context: "error" (a 400 saying what to raise) or "oldest" (Ollama routes drop the oldest turns, as Ollama does)
    target: BackendConfig | None = None  # the model whose output is served
    draft: BackendConfig | None = None  # the cheap model that proposes tokens
    drafters: list[BackendConfig] = []  # a fleet of drafters: multi-drafter consensus (speculative modes) or the gate's writers
    speculation: SpeculationConfig = msgspec.field(default_factory=SpeculationConfig)  # settings of the speculative mode
    cluster: ClusterConfig | None = None  # rpc-servers the target runs on (cluster mode; combined mode with speculation)
    gate: GateConfig = msgspec.field(default_factory=GateConfig)  # settings of the gate mode


class PeerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The peer agent of this machine (`tightwad peer start`): the top-level `[peer]` table."""

    listen: str = "127.0.0.1:9191"  # host:port the agent listens on (beyond loopback only with a token)
    token: str | None = None  # bearer token clients must send (at least 16 characters)
    token_env: str | None = None  # ...or the environment variable that holds it
    allow: list[str] = []  # client networks served, as CIDRs (e.g. "192.168.1.0/24"); empty: any address that has the token
    model_dirs: list[str] = []  # folders whose files the agent lists as models and seeds to the swarm
    peers: list[str] = []  # agent URLs of the other machines, e.g. "http://10.0.0.6:9191"
    rpc_worker_binary: str | None = None  # the `tightwad` executable whose `rpc-worker` the agent starts (default: this install's)
    rpc_ports: str = "50052-50059"  # ports the agent may start an rpc-worker on ("A-B", "A", or a comma-separated list of them)
    discovery: bool = True  # announce the agent on the local network and hear the others (UDP multicast)
    discovery_group: str = "239.255.91.91"  # multicast group of the announcements
    discovery_port: int = 9192  # UDP port of the announcements
    discovery_interface: str | None = None  # interface to announce and listen on, by IPv4 address or name (default: every IPv4 interface)
    announce_interval: float = 5.0  # seconds between announcements
    max_body_bytes: int = 65536  # largest request body accepted


class ConfigFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole file."""

    default_profile: str | None = None  # profile used when --profile is not given
    profiles: dict[str, dict[str, Any]] = {}  # name -> raw profile table
    peer: PeerConfig | None = None  # the peer agent's settings (`tightwad peer start`)
