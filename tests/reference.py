"""An independent Llama forward pass for the tests: float64, plain tensors, naive attention, no KV cache, no
fairscale, rotary embeddings through complex numbers as Meta's code computes them."""

import math

import torch


def hidden_dim(p: dict) -> int:
    h = int(2 * 4 * p["dim"] / 3)
    if p.get("ffn_dim_multiplier") is not None:
        h = int(p["ffn_dim_multiplier"] * h)
    m = p["multiple_of"]
    return m * -(-h // m)


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def scaled_freq(f, factor=8):
    """Llama 3.1's rule for one frequency: long wavelengths (> 8192 / 1) slowed factor times, short ones
    (< 8192 / 4) kept, and in between a blend weighted by 8192 / wavelength, from 1 (all slowed) to 4 (all kept)."""
    wavelength = 2 * math.pi / f
    if wavelength < 8192 / 4:
        return f
    if wavelength > 8192 / 1:
        return f / factor
    w = (8192 / wavelength - 1) / (4 - 1)
    return (1 - w) * f / factor + w * f


def rotate(x, positions, theta, scaled=False, factor=8):
    """x: (seq, heads, head_dim); pairs (0,1), (2,3), ... rotated by position * theta^(-2i/d)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if scaled:
        freqs = torch.tensor([scaled_freq(float(f), factor) for f in freqs], dtype=torch.float64)
    angles = positions.double()[:, None] * freqs[None, :]
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None, :]).reshape(x.shape)


def logits(state: dict, p: dict, tokens: list, layer_out=None, cache=None) -> torch.Tensor:
    """float64 logits (seq, vocab) of one sequence of token ids, every position seeing all before it.
    layer_out(i, x), where given, sees each layer's output x (seq, dim) and returns what goes on (x, or x
    edited), as a forward hook on Meta's block does. cache: a dtype that the keys and values are rounded to, as
    a KV cache of that dtype holds them."""
    w = {k: v.double() for k, v in state.items()}
    n_heads, n_kv = p["n_heads"], p.get("n_kv_heads") or p["n_heads"]
    hd, eps, theta = p["dim"] // n_heads, p.get("norm_eps", 1e-5), p.get("rope_theta", 10000.0)
    rope = (theta, p.get("use_scaled_rope", False), p.get("rope_scaling_factor", 8))  # Llama 3.1's factor: 8
    T = len(tokens)
    pos = torch.arange(T)
    x = w["tok_embeddings.weight"][torch.tensor(tokens)]
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(p["n_layers"]):
        L = lambda name, i=i: w[f"layers.{i}.{name}.weight"]  # noqa: E731
        h = rms_norm(x, L("attention_norm"), eps)
        q = rotate((h @ L("attention.wq").T).view(T, n_heads, hd), pos, *rope)
        k = rotate((h @ L("attention.wk").T).view(T, n_kv, hd), pos, *rope)
        v = (h @ L("attention.wv").T).view(T, n_kv, hd)
        if cache is not None:
            k, v = k.to(cache).double(), v.to(cache).double()
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=1) for t in (k, v))
        out = torch.empty(T, n_heads, hd, dtype=torch.float64)
        for head in range(n_heads):
            scores = q[:, head] @ k[:, head].T / hd ** 0.5 + causal
            out[:, head] = torch.softmax(scores, dim=-1) @ v[:, head]
        x = x + out.reshape(T, -1) @ L("attention.wo").T
        h = rms_norm(x, L("ffn_norm"), eps)
        g = h @ L("feed_forward.w1").T
        x = x + ((g * torch.sigmoid(g)) * (h @ L("feed_forward.w3").T)) @ L("feed_forward.w2").T
        if layer_out is not None:
            x = layer_out(i, x)
    return rms_norm(x, w["norm.weight"], eps) @ w["output.weight"].T


def greedy(state: dict, p: dict, prompt: list, n: int, stop: int = -1, layer_out=None) -> list:
    """n greedy tokens after prompt (fewer if ``stop`` comes), recomputing everything each step."""
    tokens = list(prompt)
    for _ in range(n):
        t = int(logits(state, p, tokens, layer_out)[-1].argmax())
        if t == stop:
            break
        tokens.append(t)
    return tokens[len(prompt):]
