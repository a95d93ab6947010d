"""Beam search bookkeeping for one prompt: which continuations survive a step, which hypotheses are finished,
and when to stop. The engine runs the beams as sequences that fork from their parents (sharing blocks by reference
count) and drop (freeing theirs); this module decides, in plain Python, which forks happen.

The rule is the usual one (and transformers' with early_stopping=False): from the 2k best continuations of all
beams, the best k that do not end become the next beams; those among the first k that end (EOS, or the length limit)
become hypotheses scored cum_logprob / length ** length_penalty; stop when the length limit is reached or no running
beam can beat the worst of k finished hypotheses at its current length.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Beam:
    tokens: list[int]  # generated so far
    logprobs: list[float]
    cum_logprob: float


@dataclass
class Candidate:
    parent: int  # index of the beam it extends
    token: int
    logprob: float
    cum_logprob: float


@dataclass
class BeamState:
    beam_width: int
    max_tokens: int
    length_penalty: float
    eos_token_ids: frozenset[int]
    beams: list[Beam] = field(default_factory=lambda: [Beam([], [], 0.0)])
    finished: list[tuple[float, Beam, str]] = field(default_factory=list)  # (score, beam, finish reason)
    done: bool = False

    def step(self, top: list[list[tuple[int, float]]]) -> list[tuple[int, Beam]]:
        """top[i]: the (token, logprob) pairs of beam i, best first (at least 2k of them). Returns the next beams
        as (parent index, beam); sets done when the search is over."""
        k = self.beam_width
        candidates = [Candidate(i, t, lp, beam.cum_logprob + lp) for i, beam in enumerate(self.beams) for t, lp in top[i]]
        candidates.sort(key=lambda c: -c.cum_logprob)
        candidates = candidates[:2 * k]
        length = len(self.beams[0].tokens) + 1
        at_limit = length >= self.max_tokens
        improvable = self._improvable(length - 1)
        next_beams: list[tuple[int, Beam]] = []
        for rank, c in enumerate(candidates):
            parent = self.beams[c.parent]
            beam = Beam(parent.tokens + [c.token], parent.logprobs + [c.logprob], c.cum_logprob)
            ends = c.token in self.eos_token_ids or at_limit
            if ends:
                if rank < k and improvable:
                    reason = "stop" if c.token in self.eos_token_ids else "length"
                    self.finished.append((c.cum_logprob / length ** self.length_penalty, beam, reason))
            elif len(next_beams) < k:
                next_beams.append((c.parent, beam))
        self.finished.sort(key=lambda f: -f[0])
        del self.finished[k:]
        self.beams = [b for _, b in next_beams]
        if at_limit or not next_beams or not self._improvable(length):
            self.done = True
        return next_beams

    def _improvable(self, length: int) -> bool:
        """Can the best running beam still beat the worst of k finished hypotheses (judged at this length)?"""
        if len(self.finished) < self.beam_width or not self.beams or length == 0:
            return True
        best_running = self.beams[0].cum_logprob / length ** self.length_penalty
        return best_running > self.finished[-1][0]

    def results(self) -> list[tuple[float, Beam, str]]:
        return sorted(self.finished, key=lambda f: -f[0])
