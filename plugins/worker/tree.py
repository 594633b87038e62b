"""Tree verification: several greedy draft continuations checked in one
``llama_decode``.

The branches are merged into a trie (a prefix two branches share is one
position). Branch ``b`` lives on its own sequence for the step: branch 0 on
the session's sequence, the others on free sequences borrowed for the step,
which first receive the session's cache by ``llama_memory_seq_cp`` (in the
unified KV cache that only adds a sequence id to the cells). One batch then
holds the session's new accepted tokens (in every sequence) and each trie
node once, tagged with the sequences of all branches through it, at the
position its depth gives; llama.cpp's causal mask keeps each node to its
own ancestors, since every cell a node may see belongs to its branch's
sequence. Logits come back for the last accepted position and every node.

Acceptance walks the trie from the root with the target's argmax, and the
session's sequence is left holding exactly the accepted path: the rejected
nodes are removed, and when the winning branch is not branch 0 its path is
copied over from the borrowed sequence. The borrowed sequences are emptied
before the step ends, so nothing they held survives it.

A tree step runs alone (the scheduler does not mix it with other jobs): a
trie's multi-sequence entries and the prefix copies are simplest to keep
right that way, and the other jobs take the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tightwad_plugins.worker.model import Context, JobCancelled, Sequence, _lib
from tightwad_plugins.worker.rejection import top2_gap


@dataclass
class Trie:
    """Nodes in order of depth (the order llama.cpp needs: positions never
    decrease within a sequence of a batch)."""

    tokens: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    # per node, the branches through it, lowest index first
    branches: list[list[int]] = field(default_factory=list)
    child: dict[tuple[int, int], int] = field(default_factory=dict)  # (parent or -1, token)

    def __len__(self) -> int:
        return len(self.tokens)


def build_trie(branches: list[list[int]]) -> Trie:
    trie = Trie()
    ends = [-1] * len(branches)  # each branch's deepest node so far
    for d in range(max((len(b) for b in branches), default=0)):
        for b, br in enumerate(branches):
            if d >= len(br):
                continue
            key = (ends[b], br[d])
            node = trie.child.get(key)
            if node is None:
                node = trie.child[key] = len(trie.tokens)
                trie.tokens.append(br[d])
                trie.depth.append(d)
                trie.branches.append([])
            trie.branches[node].append(b)
            ends[b] = node
    return trie


def count_nodes(branches: list[list[int]]) -> int:
    return len(build_trie(branches))


def accept_tree(root: np.ndarray, rows: list[np.ndarray],
                trie: Trie) -> tuple[list[int], int, list[float]]:
    """``(path, token, gaps)``: the accepted nodes from the root, the target's
    argmax where the walk stops, and the top-2 gap at each emitted position."""
    path: list[int] = []
    gaps: list[float] = []
    row, at = root, -1
    while True:
        best = int(np.argmax(row))
        gaps.append(top2_gap(row))
        node = trie.child.get((at, best))
        if node is None:
            return path, best, gaps
        path.append(node)
        row, at = rows[node], node


@dataclass
class TreeResult:
    accepted: int
    token: int
    branch: int
    gaps: list[float]
    tree_nodes: int
    n_past: int


@dataclass(eq=False)
class TreeJob:
    """"Make ``seq`` hold ``seq.tokens[:past] + new``, then check ``branches``
    after it"; ``borrowed[i]`` carries branch ``i + 1`` during the step."""

    seq: Sequence
    past: int
    new: list[int]
    branches: list[list[int]]
    borrowed: list[Sequence]
    result: TreeResult | None = None
    error: BaseException | None = None
    finished: bool = False
    cancelled: bool = False


def step_tree(ctx: Context, job: TreeJob) -> None:
    """Run ``job`` in one decode (engine thread). On every way out the
    borrowed sequences are empty and the session's tokens match its cache."""
    if job.finished:
        return
    if job.cancelled:
        job.error, job.finished = JobCancelled(), True
        return
    try:
        job.result = _run(ctx, job)
    except Exception as exc:  # noqa: BLE001 (handed to the caller)
        job.error = exc
    finally:
        for s in job.borrowed:
            ctx.clear(s)
        job.finished = True


def _run(ctx: Context, job: TreeJob) -> TreeResult:
    llama_cpp = _lib()
    seq, branches = job.seq, job.branches
    if len(branches) != len(job.borrowed) + 1:
        raise ValueError("one sequence per branch")
    want = seq.tokens[:job.past] + list(job.new)
    trie = build_trie(branches)
    depth = max((len(b) for b in branches), default=0)
    if len(want) + depth > seq.limit:
        raise ValueError(f"{len(want) + depth} tokens do not fit the context of {seq.limit}")
    # keep what the cache shares with `want`, except its last token, whose logits are needed
    limit = min(len(seq.tokens), len(want) - 1)
    common = min(job.past, limit)
    while common < limit and seq.tokens[common] == want[common]:
        common += 1
    ctx.truncate(seq, common)
    start = len(seq.tokens)
    if len(want) - start + len(trie) > ctx.n_batch:
        raise ValueError("the tree and the new tokens do not fit one batch")
    ids = [seq.index] + [s.index for s in job.borrowed]
    for s in job.borrowed:  # the session's cache, shared cell by cell
        ctx.clear(s)
        llama_cpp.llama_memory_seq_cp(ctx.mem, seq.index, s.index, -1, -1)
        s.tokens[:] = seq.tokens
    b = ctx.batch
    every = ctx.routing is not None  # a recording context wants every position's last layer
    n = 0
    for p in range(start, len(want)):
        b.token[n], b.pos[n], b.n_seq_id[n] = want[p], p, len(ids)
        for k, i in enumerate(ids):
            b.seq_id[n][k] = i
        b.logits[n] = p == len(want) - 1 or every
        n += 1
    root = n - 1
    base = len(want)
    for node, tok in enumerate(trie.tokens):
        on = trie.branches[node]
        b.token[n], b.pos[n], b.n_seq_id[n] = tok, base + trie.depth[node], len(on)
        for k, which in enumerate(on):
            b.seq_id[n][k] = ids[which]
        b.logits[n] = True
        n += 1
    b.n_tokens = n
    rc = llama_cpp.llama_decode(ctx.ptr, b)
    ctx.decodes += 1
    ctx.evaluated += n
    ctx.tree_decodes += 1
    if rc != 0:
        ctx.clear(seq)
        raise RuntimeError(f"llama_decode returned {rc}")
    seq.tokens[:] = want + branches[0]
    for s, br in zip(job.borrowed, branches[1:], strict=True):
        s.tokens[:] = want + br
    n_vocab = ctx.model.vocab.n_vocab

    def row(i: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ptr, i), shape=(n_vocab,))

    path, token, gaps = accept_tree(row(root), [row(root + 1 + k) for k in range(len(trie))],
                                    trie)
    accepted = len(path)
    chosen = trie.branches[path[-1]][0] if path else 0
    if chosen == 0:
        ctx.truncate(seq, base + accepted)
    else:  # the session's tail becomes the winning branch's path
        if not llama_cpp.llama_memory_seq_rm(ctx.mem, seq.index, base, -1):
            ctx.clear(seq)
            raise RuntimeError("llama.cpp could not roll the sequence back")
        del seq.tokens[base:]
        if accepted:
            llama_cpp.llama_memory_seq_cp(ctx.mem, ids[chosen], seq.index, base, base + accepted)
            seq.tokens.extend(branches[chosen][:accepted])
    return TreeResult(accepted=accepted, token=token, branch=chosen, gaps=gaps,
                      tree_nodes=len(trie), n_past=len(seq.tokens))
