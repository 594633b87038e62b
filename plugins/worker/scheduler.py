"""Continuous batching: every job that is waiting when the context is free
goes into the next ``llama_decode`` together, as llama-server does with
``--parallel``.

One trio task owns the context. Requests hand it ``Job``s and wait; it runs
one step at a time in a worker thread (``abandon_on_cancel=False``, so the
cache and each sequence's token list never disagree). Jobs that arrive while
a step runs join the next one; right after a step it waits a moment for the
requests it just answered to send their next job, so steady streams keep
sharing every decode.

A tree verify (``TreeJob``) takes a step of its own; when both kinds wait,
tree steps and shared steps alternate, so neither starves the other.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio

from tightwad_plugins.worker.model import Context, Job, JobCancelled
from tightwad_plugins.worker.tree import TreeJob, step_tree

log = logging.getLogger("tightwad.worker")


class Scheduler:
    def __init__(self, ctx: Context, gather: float = 0.002) -> None:
        self.ctx = ctx
        self.gather = gather  # seconds to wait for answered requests to send their next job
        self.pending: list[Job | TreeJob] = []
        # the event each job's caller waits on (kept off the Job, which the engine thread touches)
        self._done: dict[Job | TreeJob, trio.Event] = {}
        self._tree_turn = True  # whether a waiting tree goes before waiting shared jobs
        self._wake = trio.Event()
        self._closed = False
        self.steps = 0
        self.jobs = 0

    async def submit(self, job: Job | TreeJob) -> Any:
        """Run ``job`` to its end and return ``job.finish``'s value. When the
        caller is cancelled the job is dropped at the next step (the step in
        flight completes first), then the cancellation goes on."""
        if self._closed:
            raise RuntimeError("the worker is shutting down")
        done = trio.Event()
        self._done[job] = done
        self.pending.append(job)
        self.jobs += 1
        self._wake.set()
        try:
            await done.wait()
        except BaseException:
            job.cancelled = True
            with trio.CancelScope(shield=True):
                await done.wait()
            raise
        if job.error is not None:
            raise job.error
        return job.result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            answered = 0
            while True:
                if len(self.pending) < answered:  # let just-answered requests follow up
                    with trio.move_on_after(self.gather):
                        while len(self.pending) < answered:
                            self._wake = trio.Event()
                            await self._wake.wait()
                while not self.pending:
                    self._wake = trio.Event()
                    await self._wake.wait()
                await trio.sleep(0)  # jobs that arrive together share the step
                jobs = self._next()
                if len(jobs) == 1 and isinstance(jobs[0], TreeJob):
                    step = partial(step_tree, self.ctx, jobs[0])
                else:
                    step = partial(self.ctx.step, [j for j in jobs if isinstance(j, Job)])
                await trio.to_thread.run_sync(step, abandon_on_cancel=False)
                self.steps += 1
                answered = 0
                for j in jobs:
                    if j.finished:
                        self.pending.remove(j)
                        self._done.pop(j).set()
                        answered += j.error is None
        finally:
            self._closed = True  # a TreeJob's caller hands its borrowed sequences back
            for j in self.pending:  # shutting down: nobody may wait forever
                j.error = j.error or JobCancelled()
                j.finished = True
                self._done.pop(j).set()
            self.pending.clear()

    def _next(self) -> list[Job | TreeJob]:
        """The jobs of the next step: one tree alone, or every shared job."""
        trees = [j for j in self.pending if isinstance(j, TreeJob)]
        shared: list[Job | TreeJob] = [j for j in self.pending if isinstance(j, Job)]
        if trees and (self._tree_turn or not shared):
            self._tree_turn = False
            return [trees[0]]
        self._tree_turn = True
        return shared
