"""The `gate` mode's bookkeeping: a bounded answer cache for identical
deterministic requests, and the counters behind its status and metrics."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tightwad_core.records import GenRequest, Result

#: An answer longer than this (characters) is not cached: entries stay small.
MAX_ENTRY_CHARS = 64 * 1024
#: Characters of text all cached answers hold together, at most: the entry
#: count alone would let a cache of long answers grow to entries x 64 Ki.
CACHE_CHARS = 16 * 1024 * 1024


def cache_key(req: GenRequest) -> bytes | None:
    """A digest of everything that decides a reviewed answer; None when the
    request samples without a seed (its answer is not meant to repeat)."""
    greedy = req.temperature is not None and req.temperature <= 0.0
    if not greedy and req.seed is None:
        return None
    parts = [req.kind, req.messages, req.prompt, req.tools, req.tool_choice, req.max_tokens,
             list(req.stop), req.temperature, req.top_p, req.top_k, req.seed]
    return hashlib.sha256(msgspec.json.encode(parts)).digest()


class AnswerCache:
    """Least-recently-used reviewed answers: at most ``entries`` of them and
    ``max_chars`` characters of text in all."""

    def __init__(self, entries: int, max_chars: int = CACHE_CHARS) -> None:
        self.entries = entries
        self.max_chars = max_chars
        self.chars = 0  # text characters held now
        self._data: OrderedDict[bytes, Result] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes | None) -> Result | None:
        if key is None or key not in self._data:
            return None
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: bytes | None, result: Result) -> None:
        if key is None or self.entries <= 0 or len(result.text) > min(MAX_ENTRY_CHARS, self.max_chars):
            return
        old = self._data.pop(key, None)
        if old is not None:
            self.chars -= len(old.text)
        self._data[key] = result
        self.chars += len(result.text)
        while len(self._data) > self.entries or self.chars > self.max_chars:
            _, gone = self._data.popitem(last=False)
            self.chars -= len(gone.text)
            self.evictions += 1


@dataclass
class GateTotals:
    approved: int = 0
    corrected: int = 0
    rejected: int = 0
    unreviewed: int = 0
    cached: int = 0
    relayed: int = 0  # sent to the target as they are (tool requests): never drafted nor cached
    fresh_no_draft: int = 0
    drafter_failures: int = 0
    review_failures: int = 0
    draft_tokens_kept: int = 0
    draft_tokens_written: int = 0
    target_tokens_generated: int = 0
    reviewed_kept: int = 0  # draft tokens served after a review (what the target did not generate)
    review_s: float = 0.0
    target_gen_s: float = 0.0
    s_per_token: float | None = None  # the target's own decoding: seconds per token over all its generations
    decode_tokens: int = 0  # tokens after the first of the target's own generations
    decode_s: float = 0.0  # ...and the seconds they took
    last: dict[str, Any] = field(default_factory=dict)  # the last request's verdict and figures

    def observe_target(self, tokens: int, seconds: float) -> None:
        """A generation of the target's own: ``tokens`` after the first, in the
        ``seconds`` from the first token to the last (the first token's time is
        prompt processing, not decoding, so it is left out). The speed is the
        ratio of the sums, so a short continuation slowed by other requests
        weighs only as much as its few tokens."""
        self.target_gen_s += seconds
        if tokens <= 0:
            return
        self.decode_tokens += tokens
        self.decode_s += seconds
        self.s_per_token = self.decode_s / self.decode_tokens

    def saved(self) -> float | None:
        """Target time saved: the reviewed draft tokens served, times the
        target's current seconds per generated token, less every review's
        time. None until the target has generated on its own (its decoding
        speed is not known before: scoring a draft runs at prefill speed)."""
        if self.s_per_token is None:
            return None
        return self.reviewed_kept * self.s_per_token - self.review_s

    def reviewed(self) -> int:
        return self.approved + self.corrected + self.rejected

    def snapshot(self) -> dict[str, Any]:
        n = self.reviewed()
        rates = {k: (getattr(self, k) / n if n else None) for k in ("approved", "corrected", "rejected")}
        return {"approved": self.approved, "corrected": self.corrected, "rejected": self.rejected,
                "unreviewed": self.unreviewed, "cached": self.cached, "relayed": self.relayed,
                "fresh_no_draft": self.fresh_no_draft,
                "drafter_failures": self.drafter_failures, "review_failures": self.review_failures,
                "rates": rates, "draft_tokens_written": self.draft_tokens_written,
                "draft_tokens_kept": self.draft_tokens_kept,
                "target_tokens_generated": self.target_tokens_generated,
                "target_time_saved_s": None if (saved := self.saved()) is None else round(saved, 4),
                "review_s": round(self.review_s, 4), "target_generation_s": round(self.target_gen_s, 4),
                "target_s_per_token": self.s_per_token, "last": dict(self.last)}


def families(snap: dict[str, Any], members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus families (the format `_ModeCollector` reads) from a snapshot."""
    answers = [[[k], snap[k]] for k in ("approved", "corrected", "rejected", "unreviewed", "cached",
                                        "relayed", "fresh_no_draft")]
    return [
        {"name": "tightwad_gate_answers", "help": "Answers served, by how the gate decided",
         "type": "counter", "labels": ["verdict"], "samples": answers},
        {"name": "tightwad_gate_rate", "help": "Share of reviewed answers, by verdict", "type": "gauge",
         "labels": ["verdict"], "samples": [[[k], v] for k, v in snap["rates"].items()]},
        {"name": "tightwad_gate_draft_tokens_kept", "help": "Draft tokens served after review",
         "type": "counter", "labels": [], "samples": [[[], snap["draft_tokens_kept"]]]},
        {"name": "tightwad_gate_target_tokens", "help": "Tokens the target generated itself",
         "type": "counter", "labels": [], "samples": [[[], snap["target_tokens_generated"]]]},
        {"name": "tightwad_gate_target_time_saved_seconds",
         "help": "Estimated target generation time saved, less review time", "type": "gauge",
         "labels": [], "samples": [[[], snap["target_time_saved_s"]]]},
        {"name": "tightwad_gate_review_seconds", "help": "Time spent reviewing drafts",
         "type": "counter", "labels": [], "samples": [[[], snap["review_s"]]]},
        {"name": "tightwad_gate_review_failures", "help": "Reviews that failed",
         "type": "counter", "labels": [], "samples": [[[], snap["review_failures"]]]},
        {"name": "tightwad_gate_drafter_responses", "help": "Whole drafts written, per drafter",
         "type": "counter", "labels": ["drafter"], "samples": [[[m["name"]], m["responses"]] for m in members]},
        {"name": "tightwad_gate_drafter_failures", "help": "Drafts that failed or timed out, per drafter",
         "type": "counter", "labels": ["drafter"], "samples": [[[m["name"]], m["failures"]] for m in members]},
        {"name": "tightwad_gate_drafter_busy", "help": "Drafts being written now, per drafter",
         "type": "gauge", "labels": ["drafter"], "samples": [[[m["name"]], m["busy"]] for m in members]},
    ]
