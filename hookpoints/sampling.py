"""Sampled decoding that gives each example the same tokens in any batch: one random stream per example.

transformers' ``do_sample`` draws every example of a batch from torch's one global generator, so an example's
tokens change with the batch it is in, its position there, and whatever else used the generator before. A
recording is batched by length and resumed in pieces, and an intervention sweep compares conditions example
by example, so hookpoints samples differently: ``generate`` stays greedy and :class:`SampledChoice`, its last
logits processor, draws each example's token from the distribution transformers' warpers define
(temperature, top-k, top-p) with the example's own stream (numpy's PCG64 seeded from the sampling seed and
the example's key), then leaves only that token's score finite, so the argmax picks it.

Every condition of a sweep uses the same streams (common random numbers): where the edits do not change the
distribution, the sampled tokens are the same.

>>> from hookpoints.settings import Sampling
>>> choice = SampledChoice(Sampling(seed=3), ["a", "b"])
>>> choice(None, torch.tensor([[0.0, 5.0], [2.0, 0.0]])).argmax(-1).shape
torch.Size([2])
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from hookpoints.errors import UserError
from hookpoints.settings import Sampling


def example_seed(seed: int, key: object) -> int:
    """The seed of one example's stream: a hash of the sampling seed and the example's key (64 bits).

    >>> example_seed(0, "u1") == example_seed(0, "u1") != example_seed(1, "u1")
    True
    """
    text = f"{seed}\0{key}".encode("utf-8", "surrogatepass")  # a key with a lone surrogate too
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


class SampledChoice(LogitsProcessor):
    """The last logits processor of a sampled ``generate``: each row's scores -> 0 at the drawn token, -inf
    elsewhere. ``keys``: one per example of the batch, in order (example ids, or indices)."""

    def __init__(self, sampling: Sampling, keys: Sequence[object]):
        self.warpers = LogitsProcessorList()
        if sampling.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k is not None:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p is not None and sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.streams = [np.random.default_rng(example_seed(sampling.seed, key)) for key in keys]

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.streams):  # beams, or a batch that is not the one the keys describe
            raise RuntimeError(f"sampling has {len(self.streams)} example streams for a batch of {scores.shape[0]}")
        # each row's best score taken to 0 first, in float64: the same distribution, and a small temperature
        # cannot overflow (float32 scores / 1e-38 were inf, / 1e-46 divided by 0: softmax NaN, and the vocabulary's
        # last token was "drawn", without a word)
        shifted = scores.to(torch.float64, copy=True)  # [batch, vocab]
        shifted -= shifted.amax(dim=-1, keepdim=True)
        probabilities = torch.softmax(self.warpers(input_ids, shifted), dim=-1)  # [batch, vocab]
        broken = ~probabilities.isfinite().all(dim=-1)  # NaN or +inf logits, or no finite score: no distribution
        if bool(broken.any()):
            example = int(broken.nonzero()[0])
            raise RuntimeError(
                f"sampling: example {example}'s scores hold NaN or no finite value: nothing to draw from"
            )
        cdf = probabilities.cumsum(dim=-1)  # [batch, vocab]
        draws = torch.tensor([stream.random() for stream in self.streams], dtype=torch.float64)  # [batch] in [0, 1)
        target = draws.to(cdf.device)[:, None] * cdf[:, -1:]  # [batch, 1]
        # the first token whose cumulative probability passes the draw: never one of probability 0
        token = torch.searchsorted(cdf, target, right=True).clamp_(max=scores.shape[-1] - 1)  # [batch, 1]
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, token, 0.0)


def sampling_kwargs(sampling: Sampling | None, keys: Sequence[object] | None, batch_size: int) -> dict:
    """``generate``'s extra arguments: none for greedy decoding; else the sampled choice as its logits processor
    (``keys`` None: each example's index in the batch)."""
    if sampling is None:
        return {}
    if isinstance(keys, (torch.Tensor, np.ndarray)):
        keys = keys.tolist()  # its numbers (a 0-d tensor: one number, refused below)
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable | None):  # "ab": keys "a" and "b"
        raise UserError(f"sample_keys is a list of keys, one per example (such as their ids), not {keys!r:.60}")
    keys = list(range(batch_size)) if keys is None else list(keys)
    if len(keys) != batch_size:
        raise UserError(f"sample_keys holds {len(keys)} keys for a batch of {batch_size}: give one per example")
    return {"logits_processor": LogitsProcessorList([SampledChoice(sampling, keys)])}
