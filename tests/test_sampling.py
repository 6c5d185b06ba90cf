from typing import Optional

import torch

from llama.sampling import sample, sample_top_p


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, 0, 0.9), logits.argmax(-1))


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    # p = 0.6: 0.5 alone is not enough, 0.5 + 0.25 is: only tokens 1 and 3, in ratio 2:1.
    picks = sample_top_p(probs, 0.6, g)
    assert picks.shape == (20000, 1)  # Meta's shape
    picks = picks.squeeze(-1)
    counts = torch.bincount(picks, minlength=4).double() / len(picks)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.5 / 0.75) < 0.02 and abs(counts[3] - 0.25 / 0.75) < 0.02
    # A tiny p, or 0 (which Meta's takes), keeps the most likely token only.
    assert torch.all(sample_top_p(probs[:100], 1e-6, g) == 1)
    assert torch.all(sample_top_p(probs[:100], 0, g) == 1)
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample(logits, 1.0, 0.0, g), logits.argmax(-1))


def test_temperature_flattens_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(1)
    for t in (0.5, 2.0):
        counts = torch.bincount(sample(logits, t, 1.0, g), minlength=3).double() / 20000
        want = torch.softmax(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64) / t, 0)
        assert torch.allclose(counts, want, atol=0.02)


def test_a_tiny_temperature_picks_the_most_likely_token():
    """Logits of 30 divided by 1e-37 overflow float32, and 1e-300 is 0 in float32: the draw must still be the
    argmax, not fail on NaN."""
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(2)) * 10 + 20
    for top_p in (0.9, 1.0):
        for temperature in (1e-37, 1e-300):
            drawn = sample(logits, temperature, top_p, torch.Generator().manual_seed(0))
            assert torch.equal(drawn, logits.argmax(-1))


def nucleus(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The reference's set, in float64: tokens by falling probability, kept while the mass before them is at
    most p."""
    order = probs.double().argsort(descending=True)
    mass_before = probs.double()[order].cumsum(0) - probs.double()[order]
    return order[mass_before <= p]


def assert_samples_nucleus(probs: torch.Tensor, p: float, rounds: int = 10, rows: int = 1000,
                           beside: Optional[torch.Tensor] = None) -> int:
    """Draws from rows copies of one distribution (every other row of the batch one of ``beside`` where given,
    whose draws are not checked here): none outside its nucleus, each token of it as often as its share of the
    nucleus' mass. Over the whole nucleus, Pearson's chi-square statistic within 6 of its standard deviations of
    its mean (each term's variance 2 + 1 / expected count, Poisson's); each token within 6 of its own: a bound at
    3.5 held for a thousand tokens only with a lucky seed, and failed with torch 2.6's draws. Returns how many
    tokens were drawn."""
    g = torch.Generator().manual_seed(0)
    batch = probs.repeat(rows, 1) if beside is None else torch.stack([probs, beside]).repeat(rows, 1)
    picks = torch.cat([sample_top_p(batch, p, g)[:: 1 if beside is None else 2, 0] for _ in range(rounds)])
    kept = nucleus(probs, p)
    counts = torch.bincount(picks, minlength=len(probs)).double()
    assert counts.sum() == counts[kept].sum()
    share = probs.double()[kept] / probs.double()[kept].sum()
    expected = len(picks) * share
    assert ((counts[kept] - expected).abs() <= 6 * expected.sqrt() + 2).all()
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    assert chi2 <= len(kept) + 6 * (2 + 1 / expected).sum().sqrt()
    return int((counts > 0).sum())


def test_top_p_over_a_large_vocabulary():
    """A peaked distribution over 32000 tokens, as a trained model's, whose nucleus lies among the few most
    likely; and a flat one, whose nucleus is thousands of tokens: both sampled in proportion within it, also
    when rows of both are in one batch (each row's nucleus its own, the flat one's not cut to the peaked one's
    few candidates)."""
    g = torch.Generator().manual_seed(3)
    peaked = torch.softmax(torch.randn(32000, generator=g) * 5, 0)
    assert 10 < assert_samples_nucleus(peaked, 0.9) < 256
    flat = torch.softmax(torch.randn(2000, generator=g) * 0.3, 0)
    assert assert_samples_nucleus(flat, 0.9, rounds=20) > 1000  # of its 1700-odd tokens
    peaked = peaked[:2000] / peaked[:2000].sum()
    assert assert_samples_nucleus(flat, 0.9, rounds=10, rows=500, beside=peaked) > 1000
    assert assert_samples_nucleus(peaked, 0.9, rounds=10, rows=500, beside=flat) < 256
