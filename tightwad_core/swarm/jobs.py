"""Pulls a peer agent runs for others (`tightwad distribute`).

``POST /v1/swarm/pulls {"name", "sha256", "from_port"}`` asks the agent to
fetch a file into its first model folder, under the name the request
gives (whatever name the peers' manifests use). The request names what to fetch,
never where from or where to: the sources are the agent's configured
``peers``, the peers discovery heard with the same token, and, with
``from_port``, the caller itself at the address its connection came from
(the machine running `tightwad distribute` serves the file there). The pull
serves the pieces it holds while it runs, so targets help each other, and
the finished file is seeded. ``GET /v1/swarm/pulls[/<id>]`` reports progress.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from quart import Blueprint, Response, request

from tightwad_core.errors import BadRequest, NotFound, TightwadError
from tightwad_core.http.common import decode_body
from tightwad_core.http.serving import json_response

if TYPE_CHECKING:
    from tightwad_core.peer.agent import AgentState
    from tightwad_core.swarm.pull import PullProgress

log = logging.getLogger("tightwad.swarm")
MAX_RUNNING = 4   # pulls at once
MAX_KEPT = 64     # finished pulls remembered for GET


class PullRequest(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    sha256: str
    from_port: int | None = None


class Conflict(TightwadError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


@dataclass
class Job:
    id: int
    name: str
    sha256: str
    sources: list[str]
    state: str = "running"  # running, done, failed
    phase: str = "manifest"
    total: int = 0
    held: int = 0
    transferred: int = 0
    reused: int = 0
    error: str | None = None
    path: str | None = None
    started: float = field(default_factory=time.time)
    seconds: float | None = None

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "sha256": self.sha256, "state": self.state,
                "phase": self.phase, "total": self.total, "held": self.held,
                "transferred": self.transferred, "reused": self.reused, "error": self.error,
                "path": self.path, "sources": self.sources, "seconds": self.seconds}


class Jobs:
    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.ids = itertools.count(1)
        self.nursery: trio.Nursery | None = None  # the agent's, set when it runs

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == "running"]

    def remember(self, job: Job) -> None:
        self.jobs[job.id] = job
        done = [j for j in self.jobs.values() if j.state != "running"]
        for old in sorted(done, key=lambda j: j.id)[:max(0, len(self.jobs) - MAX_KEPT)]:
            del self.jobs[old.id]


def _caller(port: int) -> str:
    addr = (request.remote_addr or "").split("%")[0]
    if not addr:
        raise BadRequest("from_port: the caller's address is unknown")
    host = f"[{addr}]" if ":" in addr else addr
    return f"http://{host}:{port}"


def _target(state: AgentState, name: str, sha256: str) -> Path:
    """Where the file goes; `Conflict` when a different file has that name."""
    from tightwad_core.swarm.manifest import SwarmError, check_name, load_manifest, manifest_path

    try:
        check_name(name)
    except SwarmError as exc:
        raise BadRequest(str(exc)) from None
    if not state.settings.model_dirs:
        raise Conflict("this agent has no model_dirs to pull into ([peer] model_dirs)")
    folder = state.settings.model_dirs[0]
    if not folder.is_dir():
        raise Conflict(f"this agent's model folder {folder} does not exist")
    out = folder / name
    if out.exists():
        try:
            same = load_manifest(manifest_path(out)).sha256 == sha256
        except SwarmError:
            same = False
        if not same:
            raise Conflict(f"{name} already exists here with other (or unknown) content; "
                           "remove or rename it first")
    return out


async def _run(state: AgentState, job: Job, out: Path) -> None:
    from tightwad_core.swarm.peers import PeerSource
    from tightwad_core.swarm.pull import pull

    def progress(p: PullProgress) -> None:
        job.phase, job.total, job.held = p.phase, p.total or job.total, p.held
        job.transferred, job.reused = p.transferred, p.reused

    t0 = time.monotonic()
    try:
        result = await pull(job.sha256, [PeerSource(u, state.settings.token) for u in job.sources],
                            out, reuse_dirs=list(state.settings.model_dirs),
                            store=state.store, progress=progress)
        job.state, job.path, job.phase = "done", result.path, "done"
        job.transferred, job.reused = result.bytes_transferred, result.bytes_reused
        log.info("pulled %s: %d bytes transferred, %d reused", job.name,
                 result.bytes_transferred, result.bytes_reused)
    except Exception as exc:  # reported to whoever asked, and logged
        job.state, job.error = "failed", str(exc) or exc.__class__.__name__
        log.warning("pull of %s failed: %s", job.name, job.error)
    finally:
        job.seconds = round(time.monotonic() - t0, 3)
        if job.state == "running":  # cancelled: the agent is stopping
            job.state, job.error = "failed", "the agent stopped"


def pull_blueprint(state: AgentState, jobs: Jobs) -> Blueprint:
    bp = Blueprint("swarm_pulls", __name__)

    @bp.post("/v1/swarm/pulls")
    async def start() -> Response:
        body = decode_body(await request.get_data(), PullRequest)
        sha = body.sha256.lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise BadRequest("sha256 must be 64 hex digits (the file's whole SHA-256)")
        for job in jobs.running():
            if job.sha256 == sha:
                return json_response(job.view(), 202)
            if job.name == body.name:
                raise Conflict(f"another file named {body.name} is being pulled here now")
        if len(jobs.running()) >= MAX_RUNNING:
            raise Conflict(f"{MAX_RUNNING} pulls are running already; try again later")
        out = _target(state, body.name, sha)
        sources = list(state.settings.cfg.peers)
        if state.book is not None:
            sources += state.book.urls()
        if body.from_port is not None:
            if not 0 < body.from_port < 65536:
                raise BadRequest("from_port must be a TCP port")
            sources.append(_caller(body.from_port))
        own = state.url.rstrip("/")
        sources = list(dict.fromkeys(u.rstrip("/") for u in sources if u.rstrip("/") != own))
        if not sources:
            raise Conflict("no peers to pull from: configure [peer] peers, turn discovery on, "
                           "or send from_port")
        job = Job(next(jobs.ids), body.name, sha, sources)
        if out.exists():  # the same file is here already
            job.state, job.phase, job.path, job.seconds = "done", "done", str(out), 0.0
            jobs.remember(job)
            return json_response(job.view(), 200)
        if jobs.nursery is None:
            raise Conflict("the agent is not running pulls")
        jobs.remember(job)
        jobs.nursery.start_soon(_run, state, job, out)
        return json_response(job.view(), 202)

    @bp.get("/v1/swarm/pulls")
    async def listing() -> Response:
        return json_response({"pulls": [j.view() for j in sorted(jobs.jobs.values(),
                                                                  key=lambda j: j.id)]})

    @bp.get("/v1/swarm/pulls/<int:job_id>")
    async def one(job_id: int) -> Response:
        job = jobs.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no pull {job_id}")
        return json_response(job.view())

    return bp
