"""Llama.stream, one generation's text in pieces while it is made: against text_completion's and
chat_completion's whole text for the same seed, the float64 reference's greedy tokens, and characters whose bytes
are split across tokens (SentencePiece's byte pieces, tiktoken's byte-level pieces)."""

import io
import os
import select
import signal
import sys
import threading
import time
import types

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

from llama import Llama
from llama.chat import UNSAFE_ERROR
from llama.checkpoint import random_checkpoint

from conftest import GQA, VOCAB, program, run_cmd, torchrun, torchrun_started
from graph_replay import cpu_llama
from reference import greedy
from test_demo import DEMO
from test_llama3 import LLAMA3, LLAMA3_TOKENIZER


@pytest.fixture(scope="module", params=["eager", "graphs"])
def llama2(request, make_ckpt, tokenizer_path):
    """A generator and its weights; decoding eagerly, or from CUDA graphs as on a GPU (here graph_replay's)."""
    ckpt, state = make_ckpt(GQA)
    return cpu_llama(ckpt, tokenizer_path, 96, 2, graphs=request.param == "graphs"), state


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("l3"))
    random_checkpoint(out, LLAMA3, mp=1)
    return Llama.build(out, LLAMA3_TOKENIZER, max_seq_len=96, max_batch_size=2, device="cpu", dtype="float32")


def streamed_and_whole(g: Llama, prompt, seed: int, **kwargs):
    """The pieces of stream and the whole text of text_completion (chat_completion for a dialog), same seed."""
    g.generator.manual_seed(seed)
    pieces = list(g.stream(prompt, **kwargs))
    g.generator.manual_seed(seed)
    if isinstance(prompt, str):
        return pieces, g.text_completion([prompt], **kwargs)[0]["generation"]
    return pieces, g.chat_completion([prompt], **kwargs)[0]["generation"]["content"]


def test_pieces_join_to_the_whole_text(llama2):
    assert_pieces_join_to_the_whole_text(llama2[0], seeds=6, length=60)


def test_llama3_pieces_join_to_the_whole_text(llama3):
    assert_pieces_join_to_the_whole_text(llama3, seeds=3, length=40)


def assert_pieces_join_to_the_whole_text(g: Llama, seeds: int, length: int) -> None:
    """Sampled hot from a random model, the tokens are all over the vocabulary, many of them parts of a
    character: the pieces still join to the whole text, and no piece but the last ends in a partial character
    (U+FFFD), which waits for the tokens that complete it."""
    waited = 0
    for seed in range(seeds):
        args = dict(temperature=1.5, top_p=1.0, max_gen_len=length)
        pieces, whole = streamed_and_whole(g, "Once upon a time", seed, **args)
        assert "".join(pieces) == whole and all(pieces)
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])
        g.generator.manual_seed(seed)
        ids = g.tokenizer.encode("Once upon a time", bos=True, eos=False)
        waited += len(g.generate([ids], length, 1.5, 1.0)[0][0]) - len(pieces)
    assert waited > 0  # some pieces took several tokens: the case above was met


def test_greedy_pieces_are_the_references_text(llama2):
    g, state = llama2
    ids = g.tokenizer.encode("In the beginning", bos=True, eos=False)
    want = greedy(state, {**GQA, "vocab_size": VOCAB}, ids, 16, stop=g.tokenizer.eos_id)
    assert "".join(g.stream("In the beginning", temperature=0, max_gen_len=16)) == g.tokenizer.decode(want)


def test_a_dialog_streams_chat_completions_answer(llama2, llama3):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    for g in (llama2[0], llama3):
        pieces, whole = streamed_and_whole(g, dialog, 7, temperature=1.0, max_gen_len=30)
        assert "".join(pieces) == whole and len(pieces) > 1
    assert list(llama2[0].stream([{"role": "user", "content": "[INST] hi"}])) == [UNSAFE_ERROR]


def test_keep_cache_prefills_only_what_the_cache_lacks(llama2, monkeypatch):
    """A chat's second turn with keep_cache: the prefill starts where the tokens the first call left in the cache
    (its prompt and the answer's tokens before the last) part from the new prompt, and the answer is the float64
    reference's greedy one. Anything run on the model in between, a weight edited, or keep_cache off: the whole
    prompt is prefilled."""
    g, state = llama2
    starts = []  # (first position, tokens) of each pass (a spy on the pass itself: a forward put in place of the
    run = g.model._run  # model's would be research code's own, which keeps no cache); the position not read in a
    monkeypatch.setattr(g.model, "_run", lambda tokens, positions, *a, **kw: starts.append(  # graph's capture
        (positions[0].clone(), tokens.shape[1])) or run(tokens, positions, *a, **kw))

    def prefill_start(dialog, **kwargs) -> int:
        starts.clear()
        "".join(g.stream(dialog, temperature=0, max_gen_len=12, **kwargs))
        return int(starts[0][0])

    first = [{"role": "user", "content": "Who made the heaven and the earth?"}]
    g.model.forward(torch.tensor([[1]]), 0)
    assert prefill_start(first, keep_cache=True) == 0  # a forward pass ran since any earlier stream
    ids1 = g.formatter.encode_dialog(first)
    answer1 = g.generate([ids1], 12, temperature=0, stop_tokens=g.formatter.stop_tokens)[0][0]
    fed = ids1 + (answer1 if len(answer1) < 12 else answer1[:-1])  # the last sampled token is never fed
    second = first + [{"role": "assistant", "content": g.tokenizer.decode(answer1)},
                      {"role": "user", "content": "And the sea?"}]
    ids2 = g.formatter.encode_dialog(second)
    common = next(n for n in range(len(ids2)) if n == len(fed) or fed[n] != ids2[n])
    assert common >= len(ids1)  # not vacuous: the first turn's prompt at least is reused

    assert prefill_start(first, keep_cache=True) == 0  # generate ran since the last stream
    starts.clear()
    text = "".join(g.stream(second, temperature=0, max_gen_len=12, keep_cache=True))
    assert (int(starts[0][0]), starts[0][1]) == (common, len(ids2) - common)
    want = greedy(state, {**GQA, "vocab_size": VOCAB}, ids2, 12, stop=g.tokenizer.eos_id)
    assert text == g.tokenizer.decode(want)

    prefill_start(first, keep_cache=True)
    with torch.no_grad():
        g.model.norm.weight.mul_(1.0)  # an in-place edit, even one that changes nothing
    assert prefill_start(second, keep_cache=True) == 0
    prefill_start(first, keep_cache=True)
    g.model.layers[1].attention.wv.weight.data[0] *= 1  # an edit through .data, which counts no edit
    assert prefill_start(second, keep_cache=True) == 0
    prefill_start(first, keep_cache=True)
    attention = g.model.layers[0].attention
    monkeypatch.setattr(attention, "forward", types.MethodType(type(attention).forward, attention), raising=False)
    assert prefill_start(second, keep_cache=True) == 0  # a forward put in place: its output may differ
    monkeypatch.delattr(attention, "forward")
    prefill_start(first, keep_cache=True)
    hook = g.model.layers[0].register_forward_hook(lambda *args: None)  # a hook could change any output
    assert prefill_start(second, keep_cache=True) == 0
    hook.remove()
    prefill_start(first, keep_cache=True)
    hook = register_module_forward_hook(lambda *args: None)  # one for every module
    assert prefill_start(second, keep_cache=True) == 0
    hook.remove()
    prefill_start(first, keep_cache=True)
    layers_run_by_hand(g.model, ids1)  # the cache written, not by the model's forward
    assert prefill_start(second, keep_cache=True) == 0
    prefill_start(first, keep_cache=True)
    attention.cache_k[0, :2].mul_(1)  # the cache edited by research code
    assert prefill_start(second, keep_cache=True) == 0
    prefill_start(first, keep_cache=True)
    g.model.freqs_cis = g.model.freqs_cis * 1  # a rotary table of research code's own (RoPE scaling)
    assert prefill_start(second, keep_cache=True) == 0
    prefill_start(first, keep_cache=True)
    attention.wk = torch.nn.Sequential(wk := attention.wk)  # a wrapper with no weights of its own
    assert prefill_start(second, keep_cache=True) == 0
    attention.wk = wk
    prefill_start(first, keep_cache=True)
    attention.cache_kv = None  # a cache yet to be made (an attention put in place, say)
    assert prefill_start(second, keep_cache=True) == 0
    prefill_start(first, keep_cache=True)
    assert prefill_start(second) == 0  # keep_cache off
    prefill_start(first, keep_cache=True)
    assert prefill_start(second, keep_cache=True) == common  # and on again, with nothing in between


def test_keep_cache_after_a_stream_of_no_tokens(llama2, monkeypatch):
    """max_gen_len=0 yields nothing, and its prefill is kept: the next call prefills from where its prompt parts
    from that one's, and its text is still the reference's."""
    g, state = llama2
    starts = []  # how many prompt tokens each prefill takes from the cache
    prefill = g._prefill
    monkeypatch.setattr(g, "_prefill", lambda batch, scores, cached: starts.append(cached) or prefill(
        batch, scores, cached))
    assert list(g.stream("In the beginning", temperature=0, max_gen_len=0, keep_cache=True)) == []
    first, second = (g.tokenizer.encode(p, bos=True, eos=False) for p in ("In the beginning", "In the beginning God"))
    common = next(n for n in range(len(second)) if n == len(first) or first[n] != second[n])
    assert common > 1
    starts.clear()
    text = "".join(g.stream("In the beginning God", temperature=0, max_gen_len=6, keep_cache=True))
    assert starts[0] == common
    assert text == g.tokenizer.decode(greedy(state, {**GQA, "vocab_size": VOCAB}, second, 6, stop=g.tokenizer.eos_id))


def test_keep_cache_keeps_nothing_where_the_model_ran_before_the_stream_ended(llama2):
    """A forward pass between a stream's last piece and its end (the generator not yet exhausted) writes over the
    cache: the stream keeps nothing of it, and the next keep_cache stream's text is still the reference's."""
    g, state = llama2
    stream = g.stream("In the beginning", temperature=0, max_gen_len=1, keep_cache=True)
    next(stream)
    g.model.forward(torch.tensor([[1, 500, 600, 700, 800, 900, 1000]]), 0)
    list(stream)
    ids = g.tokenizer.encode("In the beginning God created", bos=True, eos=False)
    text = "".join(g.stream("In the beginning God created", temperature=0, max_gen_len=8, keep_cache=True))
    assert text == g.tokenizer.decode(greedy(state, {**GQA, "vocab_size": VOCAB}, ids, 8, stop=g.tokenizer.eos_id))


def test_bad_input_is_a_clear_error(llama2):
    g = llama2[0]
    for prompt, kwargs, match in (("hi", {"top_p": -0.1}, "top_p"), ("hi", {"max_gen_len": -1}, "max_gen_len"),
                                  (5, {}, "dialog 0"), ([{"role": "user"}], {}, "dialog 0")):
        with pytest.raises(ValueError, match=match):
            list(g.stream(prompt, **kwargs))


CHAT_INPUT = ["Who made the heaven and the earth?", "", "And what did he make on the sixth day?", "[INST] hi",
              "/reset", "Where is Egypt?"]


@pytest.mark.parametrize("processes", [1, 2])
def test_chat_script_answers_each_turn_as_chat_completion(processes):
    """scripts/chat.py on the demo model, greedy, fed a conversation on its input (on one process, and on two,
    the first reading it): each answer is chat_completion's for the dialog so far, its earlier answers in it;
    an empty line is skipped, a message with [INST] is not sent, /reset starts again."""
    stdin = "\n".join(CHAT_INPUT) + "\n"
    args = ["scripts/chat.py", "--temperature", "0", "--device", "cpu", "--dtype", "float32",  # 2 processes round alike
            "--max_gen_len", "24"]
    result = run_cmd([sys.executable, *args], input=stdin) if processes == 1 else torchrun(2, *args, input=stdin)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = [text.strip("\n") for text in result.stdout.split("> ")[1:]]

    g = Llama.build(str(DEMO), str(DEMO / "tokenizer.model"), max_seq_len=512, max_batch_size=1, device="cpu",
                    dtype="float32")
    want, dialog = [], []
    for message in (CHAT_INPUT[0], CHAT_INPUT[2]):
        dialog.append({"role": "user", "content": message})
        dialog.append(g.chat_completion([dialog], temperature=0, max_gen_len=24)[0]["generation"])
        want.append(dialog[-1]["content"])
    fresh = g.chat_completion([[{"role": "user", "content": CHAT_INPUT[5]}]], temperature=0, max_gen_len=24)
    assert shown[0] == want[0] and shown[1] == "" and shown[2] == want[1]
    assert shown[3].startswith("(not sent: the chat format's own tags") and shown[4] == "(the dialog starts again)"
    assert shown[5] == fresh[0]["generation"]["content"] and shown[6] == "" and len(shown) == 7


def prompted(p, timeout: float = 120) -> str:
    """p's output up to its first prompt ("> "), read as it comes: the chat is loaded and waiting for a line."""
    out, deadline = b"", time.monotonic() + timeout
    while not out.endswith(b"> ") and time.monotonic() < deadline:
        if select.select([p.stdout], [], [], 1)[0]:
            byte = os.read(p.stdout.fileno(), 1)
            if not byte:  # it ended
                break
            out += byte
    return out.decode()


def test_chat_under_torchrun_waits_for_typing_longer_than_the_collectives_time_limit():
    """The second process waits for the first one's input past LLAMA_DIST_TIMEOUT (here 2 s, 600 by default),
    which would end a collective of the run's group: a person may take longer than that to type."""
    args = ["scripts/chat.py", "--temperature", "0", "--max_gen_len", "4"]
    p = torchrun_started(2, *args, env={"LLAMA_DIST_TIMEOUT": "2"})
    try:
        first = prompted(p)
        time.sleep(3)  # both processes waiting for the first line, past the time limit
        out, err = p.communicate(CHAT_INPUT[0] + "\n/exit\n", timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, err[-3000:]
    assert first.endswith("> ") and len([text for text in (first + out).split("> ")[1:] if text.strip()]) == 1


def test_ctrl_c_at_the_prompt_of_a_chat_under_torchrun_ends_every_process():
    """Ctrl-C at the chat's first prompt, sent to torchrun and its processes as a terminal sends it: each process
    says it was interrupted and ends. The second had sat making the group the first one would make after reading
    a line, until torchrun killed it 30 s later: there in gloo's C++, which a signal on another of its threads
    doesn't wake (before the fix this failed about every other run)."""
    p = torchrun_started(2, "scripts/chat.py", "--max_gen_len", "4")
    try:
        first = prompted(p)
        time.sleep(2)  # the second process well into its wait
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert first.endswith("> ") and err.count("interrupted\n") == 2 and "forcefully" not in err, err[-3000:]


def test_chat_takes_bytes_that_are_not_utf8(tmp_path):
    """A message of bytes that aren't UTF-8 typed or piped in is answered (U+FFFD in their place), where it ended
    the chat with a traceback; so is each message after a --system of such bytes, where none was sent."""
    typed = tmp_path / "typed"
    typed.write_bytes(b"hello\n\xff\xfe there\n/exit\n")
    with typed.open("rb") as stdin:
        r = run_cmd([sys.executable, "scripts/chat.py", "--temperature", "0", "--max_gen_len", "4", "--system",
                     b"caf\xe9, brief"], stdin=stdin)
    assert r.returncode == 0, r.stderr[-3000:]
    answers = [t for t in r.stdout.split("> ")[1:] if t.strip()]
    assert len(answers) == 2 and not any("not sent" in t for t in answers), r.stdout  # both answered


def test_chat_drops_the_oldest_exchanges_that_leave_no_room(llama2):
    """chat.py's fit: as few of the oldest exchanges dropped as leave room positions for the answer; the system
    message stays; a dialog that fits is left alone."""
    sys.path.insert(0, "scripts")
    from chat import fit

    g = llama2[0]
    system = [{"role": "system", "content": "Be brief."}]
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Question {i} about the garden and the vine?"},
                  {"role": "assistant", "content": f"Answer {i}: the vine bears in its season, and the keeper waits."}]
    dialog = system + turns + [{"role": "user", "content": "And the last question?"}]
    length = lambda d: len(g.formatter.encode_dialog(d))  # noqa: E731
    room = g.model.params.max_seq_len - length(system + dialog[-5:])  # the last two exchanges and the question fit
    kept = fit(g, dialog, room)
    assert kept == system + dialog[-5:]
    assert length(system + dialog[-7:]) > g.model.params.max_seq_len - room  # one more exchange would not
    short = system + turns[:2] + dialog[-1:]
    assert length(short) <= g.model.params.max_seq_len - 8 and fit(g, short, 8) == short
    tight = g.model.params.max_seq_len - length(system + dialog[-1:])  # room for the question alone
    assert fit(g, dialog, tight) == system + dialog[-1:]


def test_chat_script_resets_to_its_system_message_and_leaves_answers_a_quarter(monkeypatch, make_ckpt,
                                                                                tokenizer_path):
    """chat.py's main in this process: after /reset the dialog is the --system message again, then the new
    question; without --max_gen_len each answer is left a quarter of max_seq_len."""
    chat = program("scripts/chat.py")
    rooms, asked = [], []
    fit, stream = chat.fit, Llama.stream

    def spied_fit(g, dialog, room):
        rooms.append(room)
        return fit(g, dialog, room)

    def spied_stream(self, dialog, *args, **kwargs):
        asked.append(dialog)
        return stream(self, dialog, *args, **kwargs)

    monkeypatch.setattr(chat, "fit", spied_fit)
    monkeypatch.setattr(Llama, "stream", spied_stream)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi\n/reset\nhello\n")))
    ckpt, _ = make_ckpt(GQA)
    chat.main(ckpt_dir=ckpt, tokenizer_path=tokenizer_path, system="Be brief.", temperature=0, max_seq_len=64,
              device="cpu", dtype="float32")
    system = {"role": "system", "content": "Be brief."}
    assert asked == [[system, {"role": "user", "content": "hi"}], [system, {"role": "user", "content": "hello"}]]
    assert rooms == [16, 16]


def layers_run_by_hand(model, ids) -> None:
    """ids through the model's blocks as research code runs them, with Meta's arguments: its KV cache written
    without the model's forward."""
    with torch.inference_mode():
        h = model.tok_embeddings(torch.tensor([ids])).to(model.compute_dtype)
        for layer in model.layers:
            h = layer(h, 0, model.freqs_cis[:len(ids)], None)


def test_a_stream_that_something_else_ran_between_fails_clearly(llama2):
    """A stream paused while the same Llama runs something else (a notebook's next cell, a zip of two streams, a
    forward pass) would continue from a KV cache written over by it, another text's: its next piece is an error
    instead, and the Llama computes right afterwards."""
    g, state = llama2
    ids = g.tokenizer.encode("In the beginning", bos=True, eos=False)
    want = greedy(state, {**GQA, "vocab_size": VOCAB}, ids, 24, stop=g.tokenizer.eos_id)
    assert len(want) == 24  # pieces to come after the first
    for other in (lambda: g.text_completion(["Once upon a time"], temperature=0, max_gen_len=8),
                  lambda: next(g.stream("Once upon a time", temperature=0)),
                  lambda: g.model.forward(torch.tensor([[1, 2, 3]]), 0),
                  lambda: layers_run_by_hand(g.model, [1, 2, 3])):
        paused = g.stream("In the beginning", temperature=0, max_gen_len=24, keep_cache=True)
        next(paused)
        other()
        with pytest.raises(ValueError, match="something else ran on this model between two steps of a generation"):
            list(paused)
        assert "".join(g.stream("In the beginning", temperature=0, max_gen_len=24)) == g.tokenizer.decode(want)


def test_threads_sharing_a_llama_take_turns(llama2):
    """Threads generating on one Llama at once (a notebook's background thread, a small server) each get their
    own text, as alone: their calls take turns on the one KV cache, where they interleaved and traded
    continuations. A stream another thread's call came between fails instead of going on wrong."""
    g, _ = llama2
    prompts = ["In the beginning", "Once upon a time"]
    alone = {p: g.text_completion([p], temperature=0, max_gen_len=30)[0]["generation"] for p in prompts}
    got = {p: [] for p in prompts}
    streamed = []

    def complete(p: str) -> None:
        for _ in range(4):
            got[p].append(g.text_completion([p], temperature=0, max_gen_len=30)[0]["generation"])

    def stream() -> None:
        for _ in range(4):
            try:
                streamed.append("".join(g.stream(prompts[0], temperature=0, max_gen_len=30)))
            except ValueError as e:
                streamed.append(str(e)[:40])

    threads = [threading.Thread(target=complete, args=(p,)) for p in prompts] + [threading.Thread(target=stream)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {p: [alone[p]] * 4 for p in prompts}
    assert set(streamed) <= {alone[prompts[0]], "something else ran on this model between"}
