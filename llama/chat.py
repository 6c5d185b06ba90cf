"""Prompt formats. Chat: how a dialog becomes prompt tokens, which ids end the answer and how the answer's tokens
become its message; the tokenizer's ``kind`` picks the format (``Llama2ChatFormat`` for
"llama2", SentencePiece; ``CodeLlama70bChatFormat`` for "codellama70b", SentencePiece with a ``<step>`` piece;
``Llama3ChatFormat`` for "llama3", tiktoken). Infilling: Code Llama's prompt for the code between a prefix and
a suffix (``infilling_prompt``)."""

from typing import TYPE_CHECKING, FrozenSet, List, Literal, Optional, Tuple, TypedDict, get_args

if TYPE_CHECKING:  # tokenizer.py imports this module
    from .tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "ipython"]  # ipython: Llama 3.1 tool output
StopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]
STOP_REASONS = get_args(StopReason)


class _Message(TypedDict):
    role: Role
    content: str


class Message(_Message, total=False):
    """A message of a dialog. Llama 3's chat answers also say how they ended (``stop_reason``, Meta's values)
    and whether they call a tool (``tool_call``: Llama 3.1's answer led by ``<|python_tag|>``); given back in a
    dialog, an assistant's message with them is encoded as the model wrote it."""
    stop_reason: StopReason
    tool_call: bool


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
STEP = "<step>"  # Code Llama 70B's end of a message, unsafe in any Code Llama dialog as in Meta's codellama code
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def _check_messages(dialog: Dialog, index: int) -> List[str]:
    """The dialog's roles, or an error saying which message is not one."""
    if not isinstance(dialog, list) or not dialog:
        raise ValueError(f"dialog {index} must be a non-empty list of messages")
    for message in dialog:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ValueError(f"dialog {index}: every message must be a dict with a 'role' and a str 'content', "
                             f"got {message!r}")
    return [message["role"] for message in dialog]


def _check_turns(turns: Dialog, index: int, roles: List[str]) -> None:
    """turns, a dialog's messages after its system message, are user and assistant alternating, ending with user
    (roles: the dialog's, for the error)."""
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or [message["role"] for message in turns] != expected or expected[-1] != "user":
        raise ValueError(f"dialog {index}: roles must be 'system' (optional), then 'user' and 'assistant' "
                         f"alternating, ending with 'user'; got {roles}")


class ChatFormatBase:
    """What every chat format has: the tokenizer, the ids that end an answer, what no message may hold, and how
    an answer is decoded."""

    answer = {"role": "assistant"}  # the answer's fields besides its content
    tags: Tuple[str, ...] = ()  # what could forge the format's turns: the reference refuses messages holding them

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer

    @property
    def stop_tokens(self) -> FrozenSet[int]:
        """The tokenizer's, as they are at the call (research code may add to Llama 3's)."""
        return frozenset(self.tokenizer.stop_tokens)

    def is_unsafe(self, dialog: Dialog) -> bool:
        return any(tag in message["content"] for tag in self.tags for message in dialog)

    def decode_answer(self, tokens: List[int], stop: Optional[int]) -> Message:
        """The answer message of the generated ``tokens``, which the stop token ``stop`` ended (None: the
        generation ran out of tokens first)."""
        return {**self.answer, "content": self.tokenizer.decode(tokens)}


class Llama2ChatFormat(ChatFormatBase):
    """Llama 2 chat: ``[INST] user [/INST] answer`` pairs, the system prompt folded into the first user turn.
    Unsafe: Llama 2's tags, and with a Code Llama tokenizer ``<step>`` too, as Meta's codellama code has it."""

    def __init__(self, tokenizer: "Tokenizer"):
        super().__init__(tokenizer)
        self.tags = SPECIAL_TAGS + (STEP,) * tokenizer.is_code_llama

    def encode_dialog(self, dialog: Dialog, index: int = 0) -> List[int]:
        roles = _check_messages(dialog, index)
        if dialog[0]["role"] == "system":
            if len(dialog) < 2:
                raise ValueError(f"dialog {index}: a system message must be followed by a user message")
            dialog = [{"role": dialog[1]["role"],
                       "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
        _check_turns(dialog, index, roles)
        tokens: List[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            tokens += self.tokenizer.encode(
                f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True, eos=True)
        tokens += self.tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return tokens


class Llama3ChatFormat(ChatFormatBase):
    """Llama 3 chat: ``<|begin_of_text|>``, then each message as ``<|start_header_id|>role<|end_header_id|>``,
    ``"\n\n"``, its stripped content and ``<|eot_id|>``, then an open assistant header for the answer.

    Roles are system, user, assistant and ipython (Llama 3.1's tool output), in any order, but the last message
    must be one the model answers: from user or ipython. The special tokens come from the tokenizer by name and
    contents are encoded as plain text, so no content can forge a header or end a turn: nothing is unsafe.

    Llama 3.1's tool calls, as Meta's 3.1 format: an answer that opens with ``<|python_tag|>`` calls a tool (its
    content is the call, e.g. ``brave_search.call(query="...")`` or code to run) and one that ends with
    ``<|eom_id|>`` waits for the tool's output (an ipython message) rather than ending its turn. The answer says
    both (``"tool_call"``, ``"stop_reason"``), and an assistant's message that says them is encoded with the
    same tokens, so a dialog can carry the model's answers as they came.
    """

    ROLES = ("system", "user", "assistant", "ipython")
    ANSWERED = ("user", "ipython")

    def __init__(self, tokenizer: "Tokenizer"):
        super().__init__(tokenizer)
        special = tokenizer.special_id
        self.begin_of_text = special("<|begin_of_text|>")
        self.start_header = special("<|start_header_id|>")
        self.end_header = special("<|end_header_id|>")
        self.eot = special("<|eot_id|>")
        self.eom = special("<|eom_id|>")
        self.python_tag = special("<|python_tag|>")

    def encode_header(self, message: Message) -> List[int]:
        """The header of a message of its role (Meta's name and argument, as encode_message's and
        encode_dialog_prompt's)."""
        return ([self.start_header] + self.tokenizer.encode(message["role"], bos=False, eos=False)
                + [self.end_header] + self.tokenizer.encode("\n\n", bos=False, eos=False))

    def encode_message(self, message: Message) -> List[int]:
        assistant = message["role"] == "assistant"
        tool_call = assistant and message.get("tool_call") is True
        end = self.eom if assistant and message.get("stop_reason") == "end_of_message" else self.eot
        return (self.encode_header(message) + [self.python_tag] * tool_call
                + self.tokenizer.encode(message["content"].strip(), bos=False, eos=False) + [end])

    def decode_answer(self, tokens: List[int], stop: Optional[int]) -> Message:
        tool_call = tokens[:1] == [self.python_tag]
        reason = "out_of_tokens" if stop is None else "end_of_message" if stop == self.eom else "end_of_turn"
        return {**self.answer, "content": self.tokenizer.decode(tokens[tool_call:]), "tool_call": tool_call,
                "stop_reason": reason}

    def encode_dialog(self, dialog: Dialog, index: int = 0) -> List[int]:
        roles = _check_messages(dialog, index)
        for j, message in enumerate(dialog):
            if message["role"] not in self.ROLES:
                raise ValueError(f"dialog {index}: message {j} has an unknown role {message['role']!r}: roles are "
                                 f"{', '.join(map(repr, self.ROLES))}")
            if message.get("stop_reason", "end_of_turn") not in STOP_REASONS or message.get("tool_call", False) not in (
                    True, False):
                raise ValueError(f"dialog {index}: message {j} has stop_reason {message.get('stop_reason')!r} and "
                                 f"tool_call {message.get('tool_call')!r}: a stop_reason is one of {STOP_REASONS} "
                                 "and a tool_call True or False, as chat_completion's answers give them")
        if roles[-1] not in self.ANSWERED:
            raise ValueError(f"dialog {index}: the last message must be from 'user' or 'ipython' for the model to "
                             f"answer, got {roles[-1]!r}; roles were {roles}")
        return self.encode_dialog_prompt(dialog)

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """Meta's: the dialog's messages, whatever their roles (research code scores an answer by ending the
        dialog with it), then an open assistant header. ``encode_dialog`` checks the dialog first."""
        tokens = [self.begin_of_text]
        for message in dialog:
            tokens += self.encode_message(message)
        return tokens + self.encode_header({"role": "assistant", "content": ""})


class CodeLlama70bChatFormat(ChatFormatBase):
    """Code Llama 70B's chat (Meta's "turns", where the tokenizer has a ``<step>`` piece): ``<s>``, then each
    message as ``" Source: role"`` (with ``"\nDestination: d"`` where the message has a ``"destination"``),
    ``"\n\n "`` and its stripped content where it has any, and ``<step>``; then ``" Source: assistant\nDestination:
    user"`` and ``"\n\n "`` for the answer, which ends with ``<step>``. Each part is encoded on its own, as
    Meta's are. Roles: system first (an empty one where the dialog starts without it), then user and assistant
    alternating, ending with user. Unsafe: Llama 2's tags and ``<step>``, as Meta's."""

    answer = {"role": "assistant", "destination": "user"}
    tags = SPECIAL_TAGS + (STEP,)

    def __init__(self, tokenizer: "Tokenizer"):
        super().__init__(tokenizer)
        self.step = tokenizer.step_id

    @property
    def stop_tokens(self) -> FrozenSet[int]:
        return super().stop_tokens | {self.step}

    def encode_dialog(self, dialog: Dialog, index: int = 0) -> List[int]:
        _check_messages(dialog, index)
        if dialog[0]["role"] != "system":
            dialog = [{"role": "system", "content": ""}] + dialog
        return self.encode_as_given(dialog, index)

    def encode_as_given(self, dialog: Dialog, index: int = 0) -> List[int]:
        """The prompt of the dialog's messages as they are, with no system message put first where it has none
        (Meta's ``dialog_prompt_tokens``: its chat_completion puts one there before calling it)."""
        roles = _check_messages(dialog, index)
        _check_turns(dialog[1:] if roles[0] == "system" else dialog, index, roles)
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            tokens += self._header(message)
            if message["content"]:
                tokens += self.tokenizer.encode("\n\n " + message["content"].strip(), bos=False, eos=False)
            tokens.append(self.step)
        return (tokens + self._header({"role": "assistant", "destination": "user"})
                + self.tokenizer.encode("\n\n ", bos=False, eos=False))

    def _header(self, message: dict) -> List[int]:
        header = f" Source: {message['role'].strip()}"
        if message.get("destination") is not None:
            header += f"\nDestination: {message['destination'].strip()}"
        return self.tokenizer.encode(header, bos=False, eos=False)


FORMATS = {"llama2": Llama2ChatFormat, "codellama70b": CodeLlama70bChatFormat, "llama3": Llama3ChatFormat}


def chat_format(tokenizer: "Tokenizer") -> ChatFormatBase:
    """The chat format that goes with this tokenizer's kind."""
    return FORMATS[tokenizer.kind](tokenizer)


def infilling_prompt(tokenizer: "Tokenizer", prefix: str, suffix: str, suffix_first: bool = False) -> List[int]:
    """Code Llama's infilling prompt, as Meta's: ``<PRE> prefix <SUF>suffix <MID>``, the model writing the middle
    after it; with suffix_first, ``<PRE> <SUF>suffix <MID> prefix``, the model continuing the prefix. The suffix is
    encoded without the space SentencePiece puts before a text (it continues the middle)."""
    check_infilling(tokenizer)
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError(f"a prefix and a suffix must be strings, got {type(prefix).__name__} and "
                         f"{type(suffix).__name__}")
    pre, suf, mid = tokenizer.prefix_id, tokenizer.suffix_id, tokenizer.middle_id
    if suffix_first:
        return ([tokenizer.bos_id, pre, suf] + tokenizer.encode_infilling(suffix) + [mid]
                + tokenizer.encode(prefix, bos=False, eos=False))
    return ([tokenizer.bos_id, pre] + tokenizer.encode(prefix, bos=False, eos=False) + [suf]
            + tokenizer.encode_infilling(suffix) + [mid])


# The names Meta's codellama gives these in its llama/generation.py, where research code imports them from.
infilling_prompt_tokens = infilling_prompt


def dialog_prompt_tokens(tokenizer: "Tokenizer", dialog: Dialog) -> List[int]:
    """Meta's codellama's prompt of a Code Llama 70B dialog (``CodeLlama70bChatFormat``), its messages as given."""
    return CodeLlama70bChatFormat(tokenizer).encode_as_given(dialog)


def check_infilling(tokenizer: "Tokenizer") -> None:
    """Fail unless the tokenizer has Code Llama's infilling pieces."""
    if None in (tokenizer.prefix_id, tokenizer.suffix_id, tokenizer.middle_id, tokenizer.eot_id):
        raise ValueError("infilling needs a Code Llama tokenizer, with the pieces ▁<PRE>, ▁<SUF>, ▁<MID> and ▁<EOT> "
                         "(a vocabulary of 32016: Code Llama and Code Llama - Instruct 7B and 13B); this one has "
                         f"{tokenizer.n_words} tokens and not all of them")
