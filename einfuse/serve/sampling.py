"""Choosing the next token: greedy (temperature 0), temperature, top-k and top-p (applied in that order, as
transformers' `generate` applies its warpers), each request drawing from its own `torch.Generator` seeded by
its `seed`, so what a request samples never depends on which other requests share its steps. Stop conditions:
`max_new_tokens`, the model's EOS ids, and `stop` sequences (token id sequences, or strings when the engine
has a tokenizer)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates.

    max_new_tokens: tokens to generate at most (0: the request finishes at once with no tokens).
    temperature: 0 is greedy (argmax; ties go to the lowest id, as torch.argmax); > 0 samples.
    top_k / top_p: keep the k most likely tokens (ties at the k-th kept) / the smallest set whose probability
        reaches p (transformers' TopKLogitsWarper / TopPLogitsWarper); None keeps every token.
    seed: seeds the request's own generator (None: drawn from torch's global generator when the request is
        added, so `torch.manual_seed` makes a run reproducible).
    stop: stop sequences, each a string (needs a tokenizer; the text is cut before it) or a sequence of token
        ids (kept in the output, as an EOS token is).
    ignore_eos: keep generating past the model's EOS tokens.
    """
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple = field(default=())
    ignore_eos: bool = False

    def __post_init__(self):
        stop = self.stop
        if isinstance(stop, (str, int)) or (isinstance(stop, (list, tuple)) and stop
                                            and all(isinstance(t, int) for t in stop)):
            stop = [stop] if not isinstance(stop, int) else [[stop]]  # one string / one token id sequence
        object.__setattr__(self, "stop", tuple(s if isinstance(s, str) else tuple(int(t) for t in s)
                                               for s in (stop or ())))
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            problems.append(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if any(len(s) == 0 for s in self.stop):
            problems.append("a stop sequence is empty")
        if problems:
            raise ValueError("einfuse: bad sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request (seed None: drawn from torch's global generator)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return torch.Generator().manual_seed(seed)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Scaled logits [..., vocab] (float32) with the tokens top-k/top-p drop set to -inf, computed as
    transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper compute them."""
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token id from one request's logits [vocab]."""
    if params.greedy:
        return int(logits.argmax().item())
    scores = filter_logits(logits.detach().cpu(), params.temperature, params.top_k, params.top_p)
    return int(torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).item())


def stopped(output: list[int], params: SamplingParams, eos_ids: frozenset[int]):
    """Why generation stops after `output`'s last token, looking at token ids only (string stops are the
    engine's, which has the text): ("stop", the EOS id or the token-id stop sequence that ended it),
    ("length", None), or None to go on."""
    if not output:
        return ("length", None) if params.max_new_tokens == 0 else None
    if not params.ignore_eos and output[-1] in eos_ids:
        return "stop", output[-1]
    for s in params.stop:
        if not isinstance(s, str) and tuple(output[-len(s):]) == s:
            return "stop", s
    return ("length", None) if len(output) >= params.max_new_tokens else None
