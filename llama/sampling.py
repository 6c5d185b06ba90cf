"""Choosing the next token from logits: greedy at temperature 0, else temperature plus nucleus (top-p)."""

from typing import Optional

import torch


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row of ``logits`` (batch, vocab), as a (batch,) long tensor."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator)


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probabilities add up to at least p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > p, 0.0)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)  # renormalises itself
    return order.gather(-1, choice).squeeze(-1)
