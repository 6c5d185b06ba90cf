"""The ``Llama`` class: build from a checkpoint, then generate, complete text and chat."""

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Collection, Dict, Iterator, List, Optional, Tuple, TypedDict, Union

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size

from . import checkpoint, distributed, kernels
from .chat import (B_INST, B_SYS, E_INST, E_SYS, SPECIAL_TAGS, UNSAFE_ERROR, Dialog, Message, Role, chat_format,
                   dialog_prompt_tokens, infilling_prompt, infilling_prompt_tokens)
from .checks import is_int
from .graphs import GraphedDecoder
from .linear import can_pack, packed_for
from .machine import available_memory, cache_dtype_for, compute_dtype_for, device_name, one_compute_dtype, pick_dtype
from .model import ModelArgs, Transformer
from .research import hook_dicts, hooked, module_sets, replaced, stamp
from .sampling import check_sampling, sample, sample_top_p
from .tokenizer import ChatFormat, Tokenizer

# With Meta's names that research code imports from its generation.py (ChatFormat: Llama 3's).
__all__ = ["Llama", "CompletionPrediction", "ChatPrediction", "InfillingPrediction", "Role", "Message", "Dialog",
           "B_INST", "E_INST", "B_SYS", "E_SYS", "SPECIAL_TAGS", "UNSAFE_ERROR", "sample_top_p",
           "infilling_prompt_tokens", "dialog_prompt_tokens", "ChatFormat"]

log = logging.getLogger("llama")
_ENGINES_SAMPLE_TOP_P = sample_top_p  # what research code may put another in the place of (``Llama._sample``)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # with logprobs=True
    logprobs: List[float]  # with logprobs=True


class InfillingPrediction(TypedDict, total=False):
    generation: str
    full_text: str  # prefix + generation + suffix
    tokens: List[str]  # with logprobs=True: each token's piece ("▁def"), as Meta's codellama gives them
    logprobs: List[float]  # with logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # with logprobs=True
    logprobs: List[float]  # with logprobs=True


def check_fits(args: ModelArgs, world: int, dtype: torch.dtype, cache_dtype: torch.dtype,
               device: torch.device) -> None:
    """Fail before allocating if this rank's weights plus KV cache can't fit the device."""
    free = available_memory(device)
    if free is None:
        return
    weights = sum(torch.Size(s).numel() for s in checkpoint.full_shapes(args).values()) * dtype.itemsize // world
    per_slot = args.cache_bytes(world, cache_dtype)
    cache = per_slot * args.max_batch_size * args.max_seq_len
    if weights > free:
        raise ValueError(f"not enough memory on {device}: this process's weights alone take {weights / 2**30:.2f} "
                         f"GiB in {str(dtype).removeprefix('torch.')}, and {free / 2**30:.2f} GiB are available: "
                         "load it on more processes (or machines), or in a smaller dtype")
    if weights + cache > free:
        raise ValueError(f"not enough memory on {device}: weights {weights / 2**30:.2f} GiB + KV cache "
                         f"{cache / 2**30:.2f} GiB (max_batch_size {args.max_batch_size} x max_seq_len "
                         f"{args.max_seq_len}) > {free / 2**30:.2f} GiB available; max_batch_size x max_seq_len must "
                         f"be at most {(free - weights) // per_slot} here")


def _build_flags(device: torch.device, world: int, dtype: torch.dtype, compute: torch.dtype,
                 pack_weights: Optional[bool], cuda_graphs: Optional[bool],
                 compile_elementwise: bool) -> Tuple[bool, bool]:
    """Whether to pack the weights and to decode from CUDA graphs: each flag's default for this machine, or an
    error for a flag asked for where it can't apply, before anything is loaded."""
    packable = device.type == "cpu" and dtype == torch.bfloat16 and can_pack(compute)
    if pack_weights and not packable:
        cannot = "" if can_pack(compute) else ", and this CPU cannot"
        raise ValueError(f"pack_weights=True needs bf16 weights on a CPU that can pack them for their products "
                         f"(kernels.c, or oneDNN for bf16 ones); here the weights are {dtype} on {device}, computed "
                         f"in {compute}{cannot}: leave pack_weights unset")
    graphable = device.type == "cuda" and world == 1
    if cuda_graphs and not graphable:
        raise ValueError(f"cuda_graphs=True needs a CUDA device and one process; here the device is {device} with "
                         f"{world} process(es): leave cuda_graphs unset")
    graphs = graphable if cuda_graphs is None else cuda_graphs
    if compile_elementwise and not graphs:
        raise ValueError("compile_elementwise=True compiles the kernels of the CUDA graphs, which need a CUDA device "
                         f"and one process (here {device}, {world} process(es)) and cuda_graphs not False: leave "
                         "compile_elementwise unset")
    return packable and pack_weights is not False, graphs


def _listed(prompt_tokens: List[List[int]]) -> List[List[int]]:
    """Prompts given as 1-D tensors or arrays of token ids as lists, as Meta's generate takes whatever torch.tensor
    does."""
    if not isinstance(prompt_tokens, (list, tuple)):
        return prompt_tokens  # for _check_generate_args to name
    return [p.tolist() if getattr(p, "ndim", None) == 1 and hasattr(p, "tolist") else p for p in prompt_tokens]


class Llama:
    @staticmethod
    @torch.inference_mode(False)  # called in it, the weights would be inference tensors: edits to them unseen
    def build(ckpt_dir: str, tokenizer_path: str, max_seq_len: int, max_batch_size: int,
              model_parallel_size: Optional[int] = None, seed: int = 1, *,
              device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype, None] = None,
              pack_weights: Optional[bool] = None, cuda_graphs: Optional[bool] = None,
              compile_elementwise: bool = False) -> "Llama":
        """Load a checkpoint saved in Meta's format, with or without torchrun, on CPU or GPU.

        model_parallel_size defaults to the world size (1 without a launcher). Any error is raised on
        every rank, so a distributed run never hangs on a rank that failed.
        pack_weights: keep the weights in the order of the product that uses them (``Transformer.pack_weights``):
        decoding a batch and prefilling get faster, loading slower by about a second per 2 GB. By default,
        wherever the weights are bf16 on the CPU and a product can take them packed: kernels.c's (in bf16 with
        AVX-512 BF16, in float32 without native bf16), or oneDNN's.
        cuda_graphs: decode from CUDA graphs (``llama.graphs``), which removes the cost of launching each step's
        hundreds of kernels from Python. By default, on a GPU with one process.
        compile_elementwise: capture the CUDA graphs with the small element-wise kernels compiled by
        torch.compile (``Transformer.compiled_elementwise``): the fastest decoding, after a compilation of some
        seconds on first use. Prefill stays eager.
        """
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size),
                            ("model_parallel_size", 1 if model_parallel_size is None else model_parallel_size)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        for name, value in (("pack_weights", pack_weights), ("cuda_graphs", cuda_graphs),
                            ("compile_elementwise", compile_elementwise)):
            if not isinstance(value, bool) and value is not None:  # "no" is true to Python
                raise ValueError(f"{name} must be True, False or None (the machine's default), got {value!r}")
        start = time.perf_counter()
        device = distributed.setup(model_parallel_size, device)
        rank, world = get_model_parallel_rank(), get_model_parallel_world_size()
        requested, dtype = dtype, pick_dtype(dtype, device)  # fails alike on every rank, or on none
        own = compute_dtype_for(dtype, device)
        compute = one_compute_dtype(dtype, own)
        error: Optional[Exception] = None
        try:
            tokenizer = Tokenizer(tokenizer_path)
            ckpt = checkpoint.Checkpoint(ckpt_dir)
            args = ckpt.model_args(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
            if tokenizer.n_words != args.vocab_size:
                raise ValueError(f"{tokenizer_path}: the tokenizer has {tokenizer.n_words} tokens but the model in "
                                 f"{ckpt_dir} has a vocabulary of {args.vocab_size} (in {len(ckpt.shards)} shard(s)): "
                                 "pass the tokenizer that came with this checkpoint, and check that none of its "
                                 "shards is missing")
        except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, not leave them waiting
            error = e
        distributed.raise_if_any_failed(error, "to load the checkpoint")
        distributed.agree("to load", params=ckpt.params, tokenizer=type(tokenizer).__name__,
                          vocabulary=tokenizer.n_words, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        try:
            pack, graphs = _build_flags(device, world, dtype, compute, pack_weights, cuda_graphs, compile_elementwise)
            check_fits(args, world, dtype, cache_dtype_for(dtype, compute), device)
            state = ckpt.load_rank(args, rank, world, dtype, device)
            del ckpt  # unmaps what the model doesn't use
            model = Transformer(args)
            model.load_state_dict(state, strict=True, assign=True)
            del state
            if device.type == "cuda":  # on a CPU the weights stay mapped from the files, or are packed (pack_weights)
                model.fuse_weights()
            model.setup_cache(compute_dtype=compute)
            packed = model.pack_weights() if pack else 0
            native = device.type == "cpu" and kernels.library() is not None  # compiled now, not at the first step
        except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, not leave them waiting
            error = e
        distributed.raise_if_any_failed(error, "to load the checkpoint")
        if distributed.rank() == 0:
            weights = str(dtype).removeprefix("torch.") + (f" ({packed} packed for {packed_for(compute)})"
                                                           if packed else "")
            notes = [" (every process does: not all their CPUs have native bf16)" if compute != own else "",
                     f", KV cache in {str(model.cache_dtype).removeprefix('torch.')}"
                     if model.cache_dtype != compute else "",
                     ", decoding from CUDA graphs" if graphs else "",
                     ", with the C kernels of llama/kernels.c" if native else "",
                     "" if requested else f" (picked for this machine: {device_name(device)})"]
            log.info("loaded %s on %d process(es) in %.2f s: %s, weights in %s, computing in %s%s", ckpt_dir, world,
                     time.perf_counter() - start, device, weights, str(compute).removeprefix("torch."),
                     "".join(notes))
        return Llama(model, tokenizer, seed, cuda_graphs=graphs, compile_elementwise=compile_elementwise)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1, cuda_graphs: bool = False,
                 compile_elementwise: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = chat_format(tokenizer)
        self.device = model.tok_embeddings.weight.device
        # A generator of our own: sampling is reproducible without touching torch's global RNG.
        self.generator = torch.Generator(self.device).manual_seed(int(seed))
        self.decoder = GraphedDecoder(model, compile_elementwise) if cuda_graphs else None
        self._kept: Optional[Tuple[List[int], tuple]] = None  # stream's keep_cache: row 0's tokens, the model then
        # One model and KV cache for every thread that calls this object: their calls take turns (``_steps``).
        self._turn = threading.RLock()

    def decode_step(self, tokens: torch.Tensor, pos: int, left_pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (batch, 1, vocab) of tokens (batch, 1) at cache position pos in cache rows 0..batch: the model's
        forward, or the replay of a CUDA graph of it when built with cuda_graphs."""
        if replaced([self.model]):  # a forward of Meta's signature put in place: rows in Meta's layout
            return self.model.forward(tokens, pos)[:, -1:]
        if self.decoder is not None:
            return self.decoder(tokens, pos, left_pad)
        return self.model.forward(tokens, pos, left_pad=left_pad, last_only=True)

    def generate(self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False,
                 stop_tokens: Union[Collection[int], int, None] = None, *,
                 stop_token: Optional[int] = None) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt; returns the new tokens (with the prompt's when echo), cut at the first stop
        token (``stop_tokens``, by default the tokenizer's), and with logprobs=True the log-probability of each
        returned token (0.0 for a prompt's first). One stop token may be given as an id, in place of the set, or
        as ``stop_token``, as to Meta's codellama.

        The prompts are left-padded to a common end, so that the batch decodes in step; each group of prompts
        of one length is prefilled in one forward pass over its own tokens only. Each row stops at its own stop
        token and the loop ends when all rows have. Each prompt gets up to min(max_gen_len, max_seq_len - its
        length) tokens, as from Meta's, whatever else is in its batch. More prompts than max_batch_size (the KV
        cache's rows) are continued max_batch_size at a time, in the order given, where Meta's code fails an
        assert.
        """
        if stop_token is not None:
            if stop_tokens is not None:
                raise ValueError("pass stop_tokens or stop_token (one of them, as Meta's codellama names it), not both")
            stop_tokens = stop_token
        if is_int(stop_tokens):
            stop_tokens = (stop_tokens,)
        tokens, probs, _ = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop_tokens)
        return tokens, probs

    def _generate(self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float, top_p: float,
                  logprobs: bool, echo: bool, stop_tokens: Optional[Collection[int]],
                  names: Optional[List[str]] = None
                  ) -> Tuple[List[List[int]], Optional[List[List[float]]], List[Optional[int]]]:
        """generate's results, and the stop token each prompt's generation ended with (None where none did).

        Each prompt gets up to min(max_gen_len, max_seq_len - its length) tokens, as in Meta's code, whatever else
        is in its batch: a row that the batch's longest prompt leaves less room (its rows end at one position) and
        that reaches the cache's end before its own limit or a stop token is continued afterwards, its prompt and
        tokens so far prefilled as a new prompt; where hooks see the rows, beside each row of its batch that is
        done (a token of its own in its place, generating none), so that row i stays the caller's prompt i of the
        batch, as in Meta's passes. names: what errors call each prompt ("prompt i" by default)."""
        prompt_tokens = _listed(prompt_tokens)
        self._check_generate_args(prompt_tokens, max_gen_len, temperature, top_p, stop_tokens, echo, names)
        stop = frozenset(self.tokenizer.stop_tokens if stop_tokens is None else stop_tokens)
        n, max_seq_len = len(prompt_tokens), self.model.params.max_seq_len
        prompts, room = list(prompt_tokens), [min(max_gen_len, max_seq_len - len(p)) for p in prompt_tokens]
        tokens: List[List[int]] = [[] for _ in range(n)]
        probs: List[List[float]] = [[] for _ in range(n)]
        ends: List[Optional[int]] = [None] * n
        in_order = distributed.any_rank(hooked(self.model.modules()))  # hooks see the rows as Meta's passes hold them
        with self._turn:  # whole: another thread's call waits for it, and it for theirs
            for group in self._row_groups(prompt_tokens):
                going, first = set(group), True
                while going:
                    rows = group if in_order else [i for i in group if i in going]
                    batch = _Batch.of([prompts[i] if i in going else prompts[i][:1] for i in rows],
                                      [room[i] if i in going else 0 for i in rows], max_seq_len, self.device,
                                      logprobs, rows, names, in_order)
                    end = batch.prompt_len
                    for pos in self._steps(batch, temperature, top_p, stop, score_prompts=logprobs and echo and first):
                        end = pos + 1
                    for i, row, row_probs, stopped_by in batch.results(end, stop, echo and first):
                        if i not in going:
                            continue
                        tokens[i] += row
                        probs[i] += row_probs
                        ends[i] = stopped_by
                        new = row[len(prompts[i]):] if echo and first else row
                        if stopped_by is None and len(new) < room[i]:  # the cache's end came first
                            prompts[i], room[i] = prompts[i] + new, room[i] - len(new)
                        else:
                            going.discard(i)
                    first = False
        return tokens, (probs if logprobs else None), ends

    def _row_groups(self, prompt_tokens: List[List[int]]) -> Iterator[List[int]]:
        """The prompts continued together, as indices: max_batch_size at a time (the KV cache's rows), in the order
        given; where research code has replaced a forward of the model or of its blocks, norms, attention or
        feed-forward (``llama.research.replaced``), grouped by length first: those take Meta's arguments, which
        can't say that a row is left-padded. (Hooks don't group them: a batch of many lengths would take as many
        turns, slower than Meta's code; they get the engine's Window, in one pass of the rows in the order given.)"""
        by_length = distributed.any_rank(replaced([self.model, *self.model.replaceable_modules()]))
        groups: Dict[int, List[int]] = {}
        for i, p in enumerate(prompt_tokens):
            groups.setdefault(len(p) if by_length else 0, []).append(i)
        size = self.model.params.max_batch_size
        for group in groups.values():
            yield from (group[k:k + size] for k in range(0, len(group), size))

    def _steps(self, batch: "_Batch", temperature: float, top_p: float, stop: Collection[int],
               score_prompts: bool = False, cached: int = 0) -> Iterator[int]:
        """Prefill the batch's prompts, then sample each row's next token into ``batch.tokens`` at each position
        from the prompts' end, yielding the position once it is there; stops when every row has sampled a stop
        token, or at the batch's last position. score_prompts: the prompts' own log-probabilities too. cached:
        how many of a one-prompt batch's first tokens the cache holds already (stream's keep_cache).

        Each step is taken in its turn (``self._turn``), and fails where anything else ran on the model since the
        one before it (``Transformer.cache_writes``: a stream's caller, or another thread, generating, calling
        forward or running the layers between its pieces), which wrote over the cache that the step would read: a
        clear error, not another text's continuation.

        The prefill and each step run in inference mode, as the whole of Meta's generate does (research code's
        wrapper of ``model.forward`` may edit the logits in place), but not across the yields: the caller's code
        between the pieces of a stream runs as it would."""
        with self._turn:
            logits = self._prefill(batch, score_prompts, cached)
            batch.writes = self.model.cache_writes()
        stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=self.device)
        done = torch.zeros(len(batch.prompts), dtype=torch.bool, device=self.device)
        prompt_len = batch.prompt_len
        for pos in range(prompt_len, batch.tokens.shape[1]):
            with self._turn:
                all_done = self._step(batch, pos, logits if pos == prompt_len else None, temperature, top_p,
                                      stop_ids, done)
            yield pos
            if all_done:
                return

    @torch.inference_mode()
    def _step(self, batch: "_Batch", pos: int, logits: Optional[torch.Tensor], temperature: float, top_p: float,
              stop_ids: torch.Tensor, done: torch.Tensor) -> bool:
        """Sample each row's token at pos into ``batch.tokens``, from logits (the prefill's), or None: the
        decoding step of the tokens before it. Whether every row has now sampled a stop token."""
        tokens, prompt_len = batch.tokens, batch.prompt_len
        if self.model.cache_writes() != batch.writes:
            raise ValueError("something else ran on this model between two steps of a generation (another "
                             "generation, stream or forward pass, in this thread or another, or its layers run by "
                             "hand), writing over the KV cache that the generation continues from: finish or close() "
                             "a stream before calling the model again, and give each thread that streams a Llama of "
                             "its own")
        if logits is None:
            logits = self.decode_step(tokens[:, pos - 1:pos], pos - 1, left_pad=batch.pad)[:, -1]
        # NaN or +infinity in a row's logits (a float16 overflow, say), or -infinity everywhere, are garbage to
        # argmax, and multinomial fails on them, on a GPU with a device-side assert that ends the process: such a
        # row samples from zeros instead, and the step's one sync with the host, below, raises the error before
        # its token is seen. (-infinity for some tokens is research code's way of banning them.)
        finite = logits.amax(dim=-1).isfinite()
        if temperature > 0:
            logits = logits.where(finite[:, None], 0.0)
        next_token = self._sample(logits, temperature, top_p)
        if temperature > 0:  # greedy picks alike on every rank: the gathered logits are the same bits
            distributed.as_first_rank_has_it(next_token)
        tokens[:, pos] = next_token
        if batch.logprobs is not None:
            batch.logprobs[:, pos] = _logprobs_of(logits, next_token)
        done |= torch.isin(next_token, stop_ids) | (batch.last <= pos)
        all_done, all_finite = torch.stack((done.all(), finite.all())).tolist()
        if not all_finite:
            raise ValueError(self._not_finite(batch.name(int(finite.logical_not().nonzero()[0])), pos - prompt_len + 1))
        batch.writes = self.model.cache_writes()
        return all_done

    def _sample(self, logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        """Each row's next token: ``sample``'s, or where research code has put a sample_top_p of its own in this
        module (Meta's generate looks it up here at every step, to sample its own way), Meta's way with it:
        softmax(logits / temperature), then that function."""
        if temperature > 0 and sample_top_p is not _ENGINES_SAMPLE_TOP_P:
            return sample_top_p(torch.softmax(logits.float() / temperature, dim=-1), top_p).reshape(-1)
        return sample(logits, temperature, top_p, self.generator)

    @torch.inference_mode()
    def _prefill(self, batch: "_Batch", score_prompts: bool, cached: int) -> torch.Tensor:
        """Each row's logits (rows, vocab) after its prompt, in the batch's passes: sorted, one forward pass per
        group of prompts of one length, over their own tokens only; with score_prompts, the prompts'
        log-probabilities written into ``batch.logprobs`` too."""
        tokens, prompts, prompt_len = batch.tokens, batch.prompts, batch.prompt_len
        last = []
        for a, b in batch.passes:
            start = prompt_len - max(len(p) for p in prompts[a:b]) + cached
            if replaced([self.model]):  # a forward of Meta's signature put in place (its rows: one length, from 0)
                logits = self.model.forward(tokens[a:b, start:prompt_len], start)
            else:
                logits = self.model.forward(tokens[a:b, start:prompt_len], start, left_pad=batch.pad[a:b],
                                            first_row=a, last_only=not score_prompts)
            if score_prompts:  # a prompt's first token has no context: 0.0, as in the reference
                batch.logprobs[a:b, start + 1:prompt_len] = _logprobs_of(logits[:, :-1],
                                                                         tokens[a:b, start + 1:prompt_len])
                batch.logprobs[a:b].scatter_(1, batch.pad[a:b, None], 0.0)  # (a pass over padding scores that too)
            last.append(logits[:, -1])
        return torch.cat(last)

    def _not_finite(self, prompt: str, token: int) -> str:
        why = ("float16 holds values up to 65504 and the activations went past it: build with dtype='bfloat16' "
               "(or 'float32')" if self.model.compute_dtype == torch.float16 else
               "the checkpoint's weights may hold NaN or infinity (a shard damaged on disk or in the download: "
               "check them with `md5sum -c checklist.chk` in the checkpoint's folder)")
        return (f"{prompt}: the logits for generated token {token} are not finite (NaN, +infinity, or "
                f"-infinity for every token): {why}")

    def _check_generate_args(self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float,
                             top_p: float, stop_tokens: Optional[Collection[int]], echo: bool,
                             names: Optional[List[str]] = None) -> None:
        distributed.agree("to generate", prompts=hashlib.sha1(repr(prompt_tokens).encode()).hexdigest()[:12],
                          max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, stop_tokens=stop_tokens,
                          echo=echo)
        params = self.model.params

        def in_vocab(ids) -> bool:
            return all(is_int(t) and 0 <= t < params.vocab_size for t in ids)

        if not isinstance(prompt_tokens, (list, tuple)):
            raise ValueError(f"prompt_tokens must be a list of prompts, each a list of token ids, got "
                             f"{type(prompt_tokens).__name__}")
        if not prompt_tokens:
            raise ValueError("no prompts given: pass at least one")
        for i, p in enumerate(prompt_tokens):
            name = _name(names, i)
            if not isinstance(p, (list, tuple)):
                raise ValueError(f"{name} must be a list of token ids, got {type(p).__name__}")
            if not p:
                raise ValueError(f"{name} is empty: give it at least one token")
            if len(p) > params.max_seq_len or (len(p) == params.max_seq_len and not echo):  # echo: scoring it
                raise ValueError(f"{name} has {len(p)} tokens, which leave no room for a new one within "
                                 f"max_seq_len {params.max_seq_len}: shorten it or build with a larger max_seq_len")
            if not in_vocab(p):
                raise ValueError(f"{name} must be a list of token ids in [0, {params.vocab_size})")
        if max_gen_len is None:  # generate's is Meta's: no default
            raise ValueError("max_gen_len must be an integer >= 0, got None")
        check_sampling(max_gen_len, temperature, top_p)
        if stop_tokens is not None and not (isinstance(stop_tokens, Collection) and in_vocab(stop_tokens)):
            raise ValueError(f"stop_tokens must be a collection of token ids in [0, {params.vocab_size}), got "
                             f"{stop_tokens!r}")

    def text_completion(self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False,
                        echo: bool = False) -> List[CompletionPrediction]:
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        tokens, probs = self.generate(prompt_tokens, self._gen_len(max_gen_len), temperature,
                                      top_p, logprobs, echo)
        return [self._prediction(self.tokenizer.decode(t), t, probs[i] if logprobs else None)
                for i, t in enumerate(tokens)]

    def text_infilling(self, prefixes: List[str], suffixes: List[str], temperature: float = 0.6, top_p: float = 0.9,
                       max_gen_len: Optional[int] = None, logprobs: bool = False,
                       suffix_first: bool = False) -> List[InfillingPrediction]:
        """Code Llama's fill in the middle: the code between each prefix and its suffix, generated until the model
        ends it (▁<EOT>, or the end-of-sequence token, where Meta's would go on). Needs a Code Llama tokenizer.
        suffix_first: the prompt in suffix-prefix-middle order (``llama.chat.infilling_prompt``)."""
        if (not isinstance(prefixes, (list, tuple)) or not isinstance(suffixes, (list, tuple))
                or len(prefixes) != len(suffixes)):
            raise ValueError("prefixes and suffixes must be two lists of strings of the same length, one suffix "
                             "per prefix")
        prompt_tokens = [infilling_prompt(self.tokenizer, p, s, suffix_first) for p, s in zip(prefixes, suffixes)]
        tokens, probs = self.generate(prompt_tokens, self._gen_len(max_gen_len), temperature, top_p,
                                      logprobs, stop_tokens={self.tokenizer.eot_id, self.tokenizer.eos_id})
        results: List[InfillingPrediction] = []
        for i, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
            middle = self.tokenizer.decode_infilling(tokens[i])
            results.append({"generation": middle, "full_text": prefix + middle + suffix})
            if logprobs:
                results[-1].update(tokens=self.tokenizer.token_names(tokens[i]), logprobs=probs[i])
        return results

    def chat_completion(self, dialogs: List[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False) -> List[ChatPrediction]:
        """Answer each dialog. One that carries the chat format's own tags gets the reference's error answer
        and costs no generation; the rest of the batch is answered normally."""
        if not isinstance(dialogs, (list, tuple)):
            raise ValueError("dialogs must be a list of dialogs (lists of messages)")
        if not dialogs:
            raise ValueError("no dialogs given: pass at least one")
        encoded = [self.formatter.encode_dialog(d, i) for i, d in enumerate(dialogs)]
        safe = [i for i, d in enumerate(dialogs) if not self.formatter.is_unsafe(d)]
        answer = self.formatter.answer  # {"role": "assistant"}, and Code Llama 70B's "destination": "user"
        results: List[ChatPrediction] = [
            self._prediction({**answer, "content": UNSAFE_ERROR}, [], [] if logprobs else None) for _ in dialogs]
        if safe:
            prompt_tokens = [encoded[i] for i in safe]
            tokens, probs, ends = self._generate(prompt_tokens, self._gen_len(max_gen_len), temperature, top_p,
                                                 logprobs, echo=False, stop_tokens=self.formatter.stop_tokens,
                                                 names=[f"dialog {i}" for i in safe])
            for j, i in enumerate(safe):
                message = self.formatter.decode_answer(tokens[j], ends[j])
                results[i] = self._prediction(message, tokens[j], probs[j] if logprobs else None)
        return results

    def stream(self, prompt: Union[str, Dialog], temperature: float = 0.6, top_p: float = 0.9,
               max_gen_len: Optional[int] = None, keep_cache: bool = False) -> Iterator[str]:
        """The text of one completion (prompt a string) or chat answer (prompt a dialog) while it is generated:
        pieces whose concatenation is text_completion's generation (chat_completion's content, led by
        ``<|python_tag|>`` where the answer is a Llama 3.1 tool call) for the same seed and arguments. Each piece
        is the text its tokens add; where a token ends within a character (holding part of its bytes), the piece
        waits for the tokens that complete it.

        keep_cache: where the previous call also kept its cache and ran to its end, and nothing has run on the
        model since (no other generation, forward pass, layer run by research code or new cache, no weight,
        module or rotary table replaced or edited in place or through ``.data``, no hook added or removed, the
        cache not edited), the prompt's tokens that the cache holds from that call (a chat's earlier turns and the
        answer it gave) are not computed again: only the rest of the prompt is prefilled. The text is then the same
        up to rounding (the cached keys and values were computed in other passes), not bit for bit."""
        if isinstance(prompt, str):
            ids, stop = self.tokenizer.encode(prompt, bos=True, eos=False), frozenset(self.tokenizer.stop_tokens)
        else:
            ids, stop = self.formatter.encode_dialog(prompt, 0), self.formatter.stop_tokens  # checks the dialog
            if self.formatter.is_unsafe(prompt):
                yield UNSAFE_ERROR
                return
        max_gen_len = self._gen_len(max_gen_len)
        self._check_generate_args([ids], max_gen_len, temperature, top_p, None, echo=False)
        cached = distributed.least(self._cached_prefix(ids) if keep_cache else 0)  # (a weight edited on one rank)
        self._kept = None
        batch = _Batch.of([ids], [max_gen_len], self.model.params.max_seq_len, self.device, logprobs=False)
        # Only the tokens from the last one already said are decoded each step (with it, for what comes between
        # them, such as SentencePiece's spaces): text of the whole so far would cost a decode as long as it.
        window: List[int] = []
        said = ""
        pos = batch.prompt_len  # where max_gen_len is 0: the prefill's cache holds the whole prompt
        for pos in self._steps(batch, temperature, top_p, stop, cached=cached):
            token = int(batch.tokens[0, pos])
            if token in stop:
                break
            window.append(token)
            text = self.tokenizer.decode(window)
            if not text.endswith("\ufffd"):  # U+FFFD: a character's bytes not all there yet
                if len(text) > len(said):  # (a token may add no text of its own)
                    yield text[len(said):]
                window, said = window[-1:], self.tokenizer.decode(window[-1:])
        with self._turn:
            if keep_cache and self.model.cache_writes() == batch.writes:  # the cache holds the tokens before pos
                self._kept = (batch.tokens[0, :pos].tolist(), self._model_state())
        text = self.tokenizer.decode(window)
        if len(text) > len(said):
            yield text[len(said):]

    def _cached_prefix(self, ids: List[int]) -> int:
        """How many of ids' first tokens cache row 0 holds from the last stream that kept its cache, if nothing
        has changed it since; at most all but the last (whose logits the prefill must give)."""
        if self._kept is None or self._kept[1] != self._model_state():
            return 0
        kept, n = self._kept[0], 0
        while n < min(len(kept), len(ids) - 1) and kept[n] == ids[n]:
            n += 1
        return n

    def _model_state(self) -> tuple:
        """What the KV cache's contents depend on besides the tokens: the model's runs and research code's writes
        (``Transformer.cache_writes``), its weights and rotary table (each one's tensor and count of in-place
        edits), the forward hooks that would run on it, the forwards of its modules and the modules put anywhere in
        the process (a wrapper around ``attention.wk`` has no weights of its own), and the caches themselves
        (edited in place by research code). (A forward put in place of the model's own counts no runs: nothing is
        kept.)"""
        model = self.model
        if replaced([model]):
            return (object(),)
        return (model.cache_writes(), [stamp(p) for p in model.parameters()], stamp(model.freqs_cis),
                [id(h) for d in hook_dicts(model.modules()) for h in d.values()],
                [(type(m), type(m).forward, m.__dict__.get("forward")) for m in model.replaceable_modules()],
                module_sets(), [a.cache_kv is not None and stamp(a.cache_kv) for a in model.attentions()])

    def _gen_len(self, max_gen_len: Optional[int]) -> int:
        """Meta's default: max_seq_len - 1, which leaves each prompt all of max_seq_len after it."""
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _prediction(self, generation: Union[str, Message], tokens: List[int], logprobs: Optional[List[float]]) -> dict:
        if logprobs is None:
            return {"generation": generation}
        return {"generation": generation, "tokens": self.tokenizer.token_names(tokens), "logprobs": logprobs}


@dataclass
class _Batch:
    """Prompts continued together: sorted longest first, or in the order given where hooks will see the rows
    (``order[i]``: row i's place among the batch's prompts), left-padded to end at one position, ``prompt_len``,
    after which the rows decode in step, each up to its own number of tokens (``last[i]``: row i's last
    position). Prefilled in ``passes``: [a, b) row ranges, one per length sorted, all rows in one given in order."""
    prompts: List[List[int]]
    order: List[int]
    prompt_len: int
    passes: List[Tuple[int, int]]
    tokens: torch.Tensor  # (rows, positions): the padded prompts, then the tokens sampled
    pad: torch.Tensor  # (rows,): each row's padding
    last: torch.Tensor  # (rows,): the position of each row's last token to generate
    logprobs: Optional[torch.Tensor]  # (rows, positions): each token's log-probability, with logprobs=True
    index: List[int]  # the caller's index of each of the batch's prompts
    names: Optional[List[str]] = None  # what errors call each of the caller's prompts, by the caller's index
    writes: Tuple[int, int] = (0, 0)  # the model's ``cache_writes()`` after the batch's last step

    @staticmethod
    def of(prompt_tokens: List[List[int]], gen_lens: List[int], max_seq_len: int, device: torch.device,
           logprobs: bool, index: Optional[List[int]] = None, names: Optional[List[str]] = None,
           in_order: bool = False) -> "_Batch":
        n = len(prompt_tokens)
        order = list(range(n)) if in_order else sorted(range(n), key=lambda i: -len(prompt_tokens[i]))
        prompts = [prompt_tokens[i] for i in order]
        prompt_len = max(map(len, prompts))
        starts = [0] if in_order else [i for i in range(n) if i == 0 or len(prompts[i]) != len(prompts[i - 1])]
        tokens = torch.zeros((len(prompts), min(max_seq_len, prompt_len + max(gen_lens))), dtype=torch.long,
                             device=device)
        for i, p in enumerate(prompts):
            tokens[i, prompt_len - len(p):prompt_len] = torch.tensor(p, dtype=torch.long)
        pad = torch.tensor([prompt_len - len(p) for p in prompts], device=device)
        last = torch.tensor([prompt_len + gen_lens[i] - 1 for i in order], device=device)
        scores = torch.zeros(tokens.shape, dtype=torch.float32, device=device) if logprobs else None
        return _Batch(prompts, order, prompt_len, list(zip(starts, starts[1:] + [n])), tokens, pad, last, scores,
                      index or list(range(n)), names)

    def name(self, row: int) -> str:
        """What errors call row's prompt."""
        i = self.index[self.order[row]]
        return _name(self.names, i)

    def results(self, end: int, stop: Collection[int], echo: bool
                ) -> Iterator[Tuple[int, List[int], List[float], Optional[int]]]:
        """For each row, by the caller's index: its tokens up to position end or its last, cut at its first stop
        token after its prompt (with the prompt when echo), their log-probabilities (empty without logprobs), and
        that stop token (None if there is none)."""
        last = self.last.tolist()
        for i, row in enumerate(self.tokens[:, :end].tolist()):
            generated = row[self.prompt_len:last[i] + 1]
            n = next((j for j, t in enumerate(generated) if t in stop), len(generated))
            first, cut = int(self.pad[i]) if echo else self.prompt_len, self.prompt_len + n
            probs = self.logprobs[i, first:cut].tolist() if self.logprobs is not None else []
            yield self.index[self.order[i]], row[first:cut], probs, generated[n] if n < len(generated) else None


def _name(names: Optional[List[str]], i: int) -> str:
    """What errors call the caller's prompt i: its name where the caller gave names (chat's "dialog i")."""
    return names[i] if names else f"prompt {i}"


def _logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log-softmax of ``logits`` (..., vocab) at ``tokens`` (...)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
