"""Choosing the next token from logits: greedy at temperature 0, else temperature plus nucleus (top-p)."""

import math
from typing import Optional, Tuple

import torch

from .checks import is_int, is_number


def check_sampling(max_gen_len: Optional[int], temperature: float, top_p: float) -> None:
    """Fail on sampling arguments that can't be used (max_gen_len None: the default; 0: none, as Meta's, for
    scoring prompts with echo and logprobs), before any work is done."""
    if max_gen_len is not None and (not is_int(max_gen_len) or max_gen_len < 0):
        raise ValueError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")
    if not is_number(temperature) or not 0 <= temperature < math.inf:  # NaN fails too
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if not is_number(top_p) or not 0 <= top_p <= 1:  # 0: the most likely token alone, as Meta's
        raise ValueError(f"top_p must be a number in [0, 1], got {top_p!r}")


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row of ``logits`` (batch, vocab), as a (batch,) long tensor."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or so close that it is 0 in float32 (and greedy)
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Less the row's largest first: at a tiny temperature logits / temperature would overflow to inf, and the
    # softmax of inf is NaN (on a GPU, a device-side assert in multinomial that ends the process).
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator).squeeze(-1)


# On 2 CPU cores, sorting the vocabulary took 4.5 ms a row of 32000 tokens and 22 ms of Llama 3's 128256 (48 and
# 207 ms a step at batch 16, where the 1b shape's step takes about 300). The few hundred most likely tokens hold a
# trained model's nucleus at any usual top_p, and taking only those took 0.4-12 ms (scripts/bench_kernels.py).
NUCLEUS_CANDIDATES = 256


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probabilities add up to at least p, in proportion
    to their probabilities: a (batch, 1) tensor of token ids, as Meta's."""
    if p >= 1:  # every token: no order needed
        return torch.multinomial(probs, num_samples=1, generator=generator)
    sorted_probs, order = _most_likely_first(probs, p)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > p, 0.0)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)  # renormalises itself
    return order.gather(-1, choice)


def _most_likely_first(probs: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """probs sorted by falling probability, with their token ids: on a CPU only the NUCLEUS_CANDIDATES most
    likely where they hold every row's nucleus (more than p). A GPU sorts the whole vocabulary in microseconds,
    and checking the rows there would wait for it mid-step."""
    if probs.device.type == "cpu":
        top, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
        if bool((top.sum(dim=-1) > p).all()):
            return top, order
    return probs.sort(dim=-1, descending=True)
