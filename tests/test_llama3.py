"""Llama 3 / 3.1 and Code Llama checkpoints: their shapes, rotary settings and shard layouts."""

import json

import pytest
import torch

from llama import Llama, ModelArgs, Transformer
from llama.checkpoint import Checkpoint, random_checkpoint
from llama.model import precompute_freqs_cis, scale_rope_freqs

from conftest import FIXTURES, launch, script_main
from reference import greedy, scaled_freq
from reference import logits as reference_logits

LLAMA3_TOKENIZER = str(FIXTURES / "llama3" / "tokenizer.model")
# Llama 3's shape in small: its vocabulary, GQA, rope_theta 5e5, ffn_dim_multiplier 1.3 with multiple_of 1024.
LLAMA3 = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 1024,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0}
LLAMA31 = {**LLAMA3, "use_scaled_rope": True}
CODE_LLAMA = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 1e6,
              "vocab_size": 32016}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    made = {}

    def make(params, mp=1):
        key = (json.dumps(params, sort_keys=True), mp)
        if key not in made:
            out = tmp_path_factory.mktemp("l3")
            made[key] = (str(out), {k: v.float() for k, v in random_checkpoint(str(out), params, mp=mp).items()})
        return made[key]
    return make


def model_of(ckpt_dir, state, max_seq_len=64):
    args = Checkpoint(ckpt_dir).model_args(max_seq_len=max_seq_len, max_batch_size=2)
    model = Transformer(args)
    model.load_state_dict({k: v for k, v in state.items() if k != "rope.freqs"}, strict=True, assign=True)
    model.setup_cache()
    return model


def test_llama3_8b_shapes():
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                     ffn_dim_multiplier=1.3, rope_theta=500000.0)
    assert args.hidden_dim == 14336 and args.head_dim == 128


def test_scaled_rope_frequencies_follow_llama31():
    base = 500000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    want = torch.tensor([scaled_freq(float(f)) for f in base], dtype=torch.float64)
    torch.testing.assert_close(scale_rope_freqs(base.float()).double(), want, rtol=1e-6, atol=0)
    assert (want == base).any() and (want == base / 8).any() and ((want != base) & (want != base / 8)).any()
    rotations = precompute_freqs_cis(128, 10000, 500000.0, use_scaled=True)
    torch.testing.assert_close(rotations[9999].real.double(), torch.cos(9999 * want), rtol=0, atol=2e-3)
    torch.testing.assert_close(rotations[9999].imag.double(), torch.sin(9999 * want), rtol=0, atol=2e-3)


# Meta's params.json of Llama 3.2 1B and 3B, 3.1 8B and 3.3 70B, as released.
RELEASED = {
    "3.2-1B": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
               "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
               "use_scaled_rope": True},
    "3.2-3B": {"dim": 3072, "ffn_dim_multiplier": 1.0, "multiple_of": 256, "n_heads": 24, "n_kv_heads": 8,
               "n_layers": 28, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
               "vocab_size": 128256},
    "3.1-8B": {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
               "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
               "vocab_size": 128256},
    "3.3-70B": {"dim": 8192, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "n_heads": 64, "n_kv_heads": 8,
                "n_layers": 80, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                "vocab_size": 128256},
}


@pytest.mark.parametrize("name, hidden, factor", [("3.2-1B", 8192, 32), ("3.2-3B", 8192, 32), ("3.1-8B", 14336, 8),
                                                  ("3.3-70B", 28672, 8)])
def test_rope_scaling_factor_of_each_release(name, hidden, factor):
    """Llama 3.2's 1B and 3B were trained with the scaling's factor at 32 (their Hugging Face configs), the
    others with 8, and params.json doesn't say: the shapes tell (the SwiGLU widths are those of the releases)."""
    args = ModelArgs.from_params(RELEASED[name])
    assert args.hidden_dim == hidden and args.rope_factor == factor
    assert ModelArgs.from_params({**RELEASED[name], "rope_scaling_factor": 4.0}).rope_factor == 4.0


def test_rope_scaling_factor_reaches_the_rotations(ckpts):
    """A params.json's rope_scaling_factor, here Llama 3.2's 32, against the reference with 32: over 160
    positions the model differs from one scaled by 8, so a factor that went astray shows."""
    params = {**LLAMA31, "rope_scaling_factor": 32.0}
    ckpt, state = ckpts(params)
    model = model_of(ckpt, state, max_seq_len=160)
    tokens = torch.randint(0, 128256, (160,), generator=torch.Generator().manual_seed(2)).tolist()
    got = model.forward(torch.tensor([tokens]), 0)[0].double()
    torch.testing.assert_close(got, reference_logits(state, params, tokens), rtol=1e-4, atol=1e-4)
    by_8 = reference_logits(state, LLAMA31, tokens)
    assert (by_8 - got).abs().max() > 1e-3


@pytest.mark.parametrize("params", [LLAMA3, LLAMA31, CODE_LLAMA], ids=["llama3", "llama3.1", "code-llama"])
def test_logits_match_float64_reference(ckpts, params):
    ckpt, state = ckpts(params)
    model = model_of(ckpt, state)
    tokens = torch.randint(0, params["vocab_size"], (40,), generator=torch.Generator().manual_seed(1)).tolist()
    got = model.forward(torch.tensor([tokens]), 0)[0].double()
    torch.testing.assert_close(got, reference_logits(state, params, tokens), rtol=1e-4, atol=1e-4)
    if params.get("use_scaled_rope"):  # the scaling changes the result: the flag isn't ignored
        plain = reference_logits(state, {**params, "use_scaled_rope": False}, tokens)
        assert (plain - got).abs().max() > 1e-3


def test_llama3_shards_split_the_embedding_on_the_vocabulary(ckpts, tmp_path):
    ckpt, _ = ckpts(LLAMA3, mp=2)
    shard = torch.load(f"{ckpt}/consolidated.00.pth", weights_only=True)
    assert shard["tok_embeddings.weight"].shape == (128256 // 2, 64) and "rope.freqs" not in shard
    # reshard.py keeps the family's layout: 2 -> 1 -> 2 gives the same files' tensors back.
    one, two = tmp_path / "one", tmp_path / "two"
    for src, out, mp in ((ckpt, one, 1), (one, two, 2)):
        script_main("reshard", "--ckpt_dir", str(src), "--out_dir", str(out), "--mp", str(mp))
    again = torch.load(two / "consolidated.00.pth", weights_only=True)
    assert again.keys() == shard.keys() and all(torch.equal(again[k], shard[k]) for k in shard)


def test_llama2_shards_split_the_embedding_on_its_dimension(ckpts):
    ckpt, _ = ckpts(CODE_LLAMA, mp=2)
    shard = torch.load(f"{ckpt}/consolidated.01.pth", weights_only=True)
    assert shard["tok_embeddings.weight"].shape == (32016, 32) and "rope.freqs" in shard


def test_llama3_mp2_on_one_and_two_processes_gives_reference_greedy_tokens(ckpts):
    from llama import Tokenizer
    ckpt, state = ckpts(LLAMA3, mp=2)
    prompts = ["The capital of France", "def main():\n    print("]
    tok = Tokenizer(LLAMA3_TOKENIZER)
    want = [greedy(state, LLAMA3, tok.encode(p, bos=True, eos=False), 8, stop=tok.eos_id) for p in prompts]
    args = ["tests/generate_driver.py", "--ckpt_dir", ckpt, "--tokenizer_path", LLAMA3_TOKENIZER,
            "--prompts", json.dumps(prompts)]
    result = launch(2, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("TOKENS "))
    assert json.loads(line[7:]) == want
    g = Llama.build(ckpt, LLAMA3_TOKENIZER, max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32")
    assert g.generate([tok.encode(p, bos=True, eos=False) for p in prompts], 8, temperature=0)[0] == want
