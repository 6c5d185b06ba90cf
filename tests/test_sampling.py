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
    counts = torch.bincount(picks, minlength=4).double() / len(picks)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.5 / 0.75) < 0.02 and abs(counts[3] - 0.25 / 0.75) < 0.02
    # A tiny p keeps the most likely token only.
    assert torch.all(sample_top_p(probs[:100], 1e-6, g) == 1)


def test_temperature_flattens_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(1)
    for t in (0.5, 2.0):
        counts = torch.bincount(sample(logits, t, 1.0, g), minlength=3).double() / 20000
        want = torch.softmax(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64) / t, 0)
        assert torch.allclose(counts, want, atol=0.02)
