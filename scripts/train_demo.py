"""Train the demo model in models/demo: a small Llama that writes King James English, in Meta's format.

    python scripts/train_demo.py [--text /usr/lib/bible.data] [--out_dir models/demo] [--steps 1200] [--seed 0]

The text is the King James Version of the Bible (1611; public domain outside the United Kingdom) from Debian's
``bible-kjv-text`` package, which installs it, compressed, as /usr/lib/bible.data:

    sudo apt-get install bible-kjv-text
    # or, without installing: apt-get download bible-kjv-text && dpkg -x bible-kjv-text_*.deb kjv
    #                         and pass --text kjv/usr/lib/bible.data

Only this script needs it; the engine, the examples and the tests use what it writes. ``--text`` also takes a
plain text file with one verse a line as ``Ge1:1 In the beginning ...`` (the package's text, uncompressed).

What it does, deterministically given --seed (same machine, same torch, same number of threads):
  1. reads the verses, drops their references and groups them into chapters of running prose;
  2. holds out every 50th chapter (the 26th, 76th, ...) for evaluation: neither the tokenizer nor the model
     ever sees them;
  3. trains a SentencePiece BPE tokenizer (byte fallback, 4096 pieces) on the training chapters;
  4. trains the project's own ``llama.model.Transformer`` on them (AdamW, warmup then cosine decay), printing
     step, loss, tokens/s, elapsed and time left, and the held-out loss now and then;
  5. writes params.json, consolidated.00.pth (bf16, Meta's keys and rope.freqs), checklist.chk,
     tokenizer.model and tokenizer_checklist.chk into --out_dir, as Meta's release has them.
With --test_data DIR it also writes a held-out excerpt and the training text's word list there, for
tests/test_demo.py.

The defaults take about 25 minutes on two idle AVX-512 cores (53 on two shared ones).
"""

import argparse
import hashlib
import io
import json
import math
import os
import re
import struct
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import sentencepiece as spm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llama import checkpoint, distributed  # noqa: E402
from llama.cli import one_line_errors, positive_int  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402

DEBIAN_TEXT = "/usr/lib/bible.data"
HOW_TO_GET = (f"the King James text is read from Debian's bible-kjv-text package, which installs it as {DEBIAN_TEXT}:\n"
              "    sudo apt-get install bible-kjv-text\n"
              "or, without installing it:\n"
              "    apt-get download bible-kjv-text && dpkg -x bible-kjv-text_*.deb kjv\n"
              "    python scripts/train_demo.py --text kjv/usr/lib/bible.data")
HELD_OUT_EVERY = 50  # every 50th chapter is held out ...
HELD_OUT_AT = 25     # ... starting with the 26th (Genesis 26), so Genesis 1 stays in training

SHAPE = {"dim": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 64, "norm_eps": 1e-5}


# --- the text --------------------------------------------------------------------------------------------

def lzw_decompress(data: bytes, max_bits: int) -> bytes:
    """Decode one stream of Unix ``compress`` codes (LZW, block mode, codes packed LSB first).

    compress reads its codes in chunks of ``n_bits`` bytes (eight codes) and starts a new chunk whenever the
    code width grows or the table is cleared, so the rest of the current chunk is skipped at those points.
    """
    clear = 256
    table: List[bytes] = [bytes([i]) for i in range(256)] + [b""]
    out = bytearray()
    n_bits, chunk_start, pos, total = 9, 0, 0, len(data) * 8
    data = data + b"\0\0"  # a code spans at most 3 bytes
    prev = b""

    def next_chunk(p: int, width: int) -> int:
        size = width * 8
        return chunk_start + -(-(p - chunk_start) // size) * size

    while True:
        if len(table) > (1 << n_bits) - 1 and n_bits < max_bits:
            pos = chunk_start = next_chunk(pos, n_bits)
            n_bits += 1
        if pos + n_bits > total:
            break
        code = (int.from_bytes(data[pos >> 3:(pos >> 3) + 3], "little") >> (pos & 7)) & ((1 << n_bits) - 1)
        pos += n_bits
        if code == clear:
            pos = chunk_start = next_chunk(pos, n_bits)
            n_bits, prev = 9, b""
            del table[257:]
            continue
        if code < len(table):
            entry = table[code]
        elif code == len(table) and prev:
            entry = prev + prev[:1]
        else:
            raise ValueError(f"corrupt compressed data: code {code} with a table of {len(table)}")
        out += entry
        if prev and len(table) < (1 << max_bits):
            table.append(prev + entry[:1])
        prev = entry
    return bytes(out)


def read_bible_data(raw: bytes) -> str:
    """The text inside the Bible Retrieval System's data file (bible-kjv-text's /usr/lib/bible.data).

    Layout: an 80-byte title ("EC02Compressed Data File"), then big-endian 32-bit words: a word we don't
    need, the uncompressed block size, the number of blocks n, and n + 1 file offsets. The 3 bytes before the
    first offset are a ``compress`` header (magic 1f 9d, then flags with the maximum code width); each block
    between two offsets is a ``compress`` code stream of its own.
    """
    _, block_size, n = struct.unpack(">III", raw[80:92])
    offsets = struct.unpack(f">{n + 1}I", raw[92:92 + 4 * (n + 1)])
    header = raw[offsets[0] - 3:offsets[0]]
    if header[:2] != b"\x1f\x9d":
        raise ValueError("unexpected bible.data layout: no compress header before the first block")
    blocks = [lzw_decompress(raw[a:b], header[2] & 0x1F) for a, b in zip(offsets, offsets[1:])]
    if any(len(b) != block_size for b in blocks[:-1]):
        raise ValueError("unexpected bible.data layout: a block decompressed to the wrong size")
    return b"".join(blocks).decode("ascii")


VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*\S)\s*$")


def read_chapters(path: str) -> List[Tuple[str, str]]:
    """[(reference like 'Ge1', the chapter's verses joined into running prose)], in the Bible's order."""
    raw = Path(path).read_bytes()
    text = read_bible_data(raw) if raw[:4] == b"EC02" else raw.decode("utf-8")
    chapters: Dict[str, List[str]] = {}
    for line in text.splitlines():
        m = VERSE.match(line)
        if m:  # lines that aren't verses (the file's title) are left out
            chapters.setdefault(m[1] + m[2], []).append(" ".join(m[4].split()))
    if len(chapters) < 100:
        raise ValueError(f"{path}: found {len(chapters)} chapters of verses like 'Ge1:1 In the beginning ...'; "
                         "expected the whole Bible (1189)")
    return [(ref, " ".join(verses)) for ref, verses in chapters.items()]


def split_chapters(chapters: List[Tuple[str, str]]) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(training chapters, held-out chapters): every HELD_OUT_EVERY-th chapter is held out."""
    train = [c for i, c in enumerate(chapters) if i % HELD_OUT_EVERY != HELD_OUT_AT]
    held = [c for i, c in enumerate(chapters) if i % HELD_OUT_EVERY == HELD_OUT_AT]
    return train, held


# --- tokenizer -------------------------------------------------------------------------------------------

def train_tokenizer(chapters: List[Tuple[str, str]], vocab_size: int) -> bytes:
    """A byte-fallback BPE SentencePiece model with Llama's special ids, trained on the training text only.
    Deterministic: one thread, every sentence in the Bible's order, no sampling or shuffling."""
    sentences = [s for _, text in chapters for s in re.split(r"(?<=[.;:?!])\s+", text) if s]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1,
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=16384, minloglevel=2)
    return model.getvalue()


def encode_chapters(sp: spm.SentencePieceProcessor, chapters: List[Tuple[str, str]]) -> torch.Tensor:
    """All chapters as one stream of token ids, each as BOS, its text, EOS."""
    ids: List[int] = []
    for _, text in chapters:
        ids += [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    return torch.tensor(ids, dtype=torch.long)


# --- model -----------------------------------------------------------------------------------------------

def init_weights(model: Transformer, n_layers: int, seed: int) -> None:
    """Transformer's weights come uninitialised (they are normally loaded): normal(0, 0.02) for every matrix,
    scaled down by sqrt(2 * n_layers) for those that write into the residual stream (wo, w2), norms at 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def batches(stream: torch.Tensor, batch_size: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    """batch_size random windows of seq_len + 1 tokens."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=g)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


def loss_of(model: Transformer, window: torch.Tensor) -> torch.Tensor:
    logits = model.forward_train(window[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))


@torch.no_grad()
def held_out_loss(model: Transformer, stream: torch.Tensor, seq_len: int, max_windows: int) -> float:
    """Mean token loss over consecutive windows of the held-out stream (at most max_windows of them)."""
    n = min(max_windows, (len(stream) - 1) // seq_len)
    windows = torch.stack([stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])
    return sum(loss_of(model, w[None]).item() for w in windows) / n


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:d}m{seconds % 60:02d}s"


def save(model: Transformer, params: dict, tokenizer: bytes, out_dir: Path) -> None:
    """Meta's layout: params.json, consolidated.00.pth (bf16, with rope.freqs), checklist.chk, tokenizer.model
    and tokenizer_checklist.chk."""
    checklist = f"{hashlib.md5(tokenizer).hexdigest()}  tokenizer.model\n"
    checkpoint.save_full(model.state_dict(), model.params, params, str(out_dir), files={
        "tokenizer.model": lambda tmp: tmp.write_bytes(tokenizer),
        "tokenizer_checklist.chk": lambda tmp: tmp.write_text(checklist)})


def write_test_data(test_dir: Path, train: List[Tuple[str, str]], held: List[Tuple[str, str]],
                    excerpt_chars: int) -> None:
    """A held-out excerpt (whole held-out chapters, up to excerpt_chars) and the training text's word list."""
    test_dir.mkdir(parents=True, exist_ok=True)
    excerpt, size = [], 0
    for _, text in held:
        if size + len(text) > excerpt_chars and excerpt:
            break
        excerpt.append(text)
        size += len(text) + 1
    (test_dir / "kjv_heldout.txt").write_text("\n".join(excerpt) + "\n")
    words = sorted({w.lower() for _, text in train for w in re.findall(r"[A-Za-z]+", text)})
    (test_dir / "kjv_words.txt").write_text("\n".join(words) + "\n")
    print(f"wrote {test_dir / 'kjv_heldout.txt'} ({len(excerpt)} held-out chapters, {size} characters) and "
          f"{test_dir / 'kjv_words.txt'} ({len(words)} words of the training text)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=DEBIAN_TEXT,
                        help=f"bible-kjv-text's {DEBIAN_TEXT}, or a plain text of 'Ge1:1 ...' verse lines")
    parser.add_argument("--out_dir", default=str(ROOT / "models" / "demo"))
    parser.add_argument("--test_data", help="also write the held-out excerpt and word list the tests use here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=positive_int, default=1200)
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--seq_len", type=positive_int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--vocab_size", type=positive_int, default=4096)
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (results depend on it)")
    parser.add_argument("--eval_every", type=positive_int, default=100)
    parser.add_argument("--log_every", type=positive_int, default=10)
    args = parser.parse_args()

    if not Path(args.text).is_file():
        sys.exit(f"error: {args.text} not found: {HOW_TO_GET}")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    train_text, held_text = split_chapters(read_chapters(args.text))
    print(f"text: {len(train_text)} training chapters, {len(held_text)} held out "
          f"(every {HELD_OUT_EVERY}th: {', '.join(ref for ref, _ in held_text[:4])}, ...)")
    tokenizer = train_tokenizer(train_text, args.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    train_ids, held_ids = encode_chapters(sp, train_text), encode_chapters(sp, held_text)
    print(f"tokenizer: {sp.vocab_size()} pieces; {len(train_ids):,} training tokens, {len(held_ids):,} held out "
          f"({time.perf_counter() - start:.0f} s)")
    if args.test_data:
        write_test_data(Path(args.test_data), train_text, held_text, excerpt_chars=24_000)

    for var in distributed.LAUNCHER_VARS:
        os.environ.pop(var, None)
    distributed.setup(None, "cpu")  # Transformer's fairscale layers need a model-parallel group: one process
    params = {**SHAPE, "vocab_size": sp.vocab_size()}
    model_args = ModelArgs.from_params(params, max_seq_len=args.seq_len, max_batch_size=1)
    checkpoint.check_split(model_args, 2)  # the tests run it on 2 processes
    model = Transformer(model_args)
    init_weights(model, model_args.n_layers, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {json.dumps(params)}, SwiGLU hidden {model_args.hidden_dim}, {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:  # linear warmup, then cosine down to a tenth
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    g = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    print(f"training: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens "
          f"({args.steps * tokens_per_step / len(train_ids):.1f} epochs), {args.threads} threads")
    train_start, running = time.perf_counter(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_of(model, batches(train_ids, args.batch_size, args.seq_len, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = time.perf_counter() - train_start
            line = (f"step {done:5d}/{args.steps}  loss {sum(running) / len(running):.3f}  "
                    f"lr {lr_at(step):.2e}  {done * tokens_per_step / elapsed:,.0f} tokens/s  "
                    f"elapsed {fmt_time(elapsed)}  left {fmt_time(elapsed / done * (args.steps - done))}")
            if done % args.eval_every == 0 or done == args.steps:
                line += f"  held-out loss {held_out_loss(model, held_ids, args.seq_len, 16):.3f}"
            print(line, flush=True)
            running = []

    final = held_out_loss(model, held_ids, args.seq_len, 10_000)
    print(f"held-out loss over all {len(held_ids):,} held-out tokens: {final:.3f} (perplexity {math.exp(final):.1f})")
    out = Path(args.out_dir)
    save(model, params, tokenizer, out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB) in {fmt_time(time.perf_counter() - start)} in all")


if __name__ == "__main__":
    with one_line_errors():
        main()
