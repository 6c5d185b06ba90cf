"""Chat formats: how a dialog becomes prompt tokens. The tokenizer's ``kind`` picks the format."""

from typing import List, Literal, TypedDict

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def _check_messages(dialog: Dialog, index: int) -> None:
    if not isinstance(dialog, list) or not dialog:
        raise ValueError(f"dialog {index} must be a non-empty list of messages")
    for message in dialog:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ValueError(f"dialog {index}: every message must be a dict with a 'role' and a str 'content', "
                             f"got {message!r}")


class Llama2ChatFormat:
    """Llama 2 chat: ``[INST] user [/INST] answer`` pairs, the system prompt folded into the first user turn."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @staticmethod
    def is_unsafe(dialog: Dialog) -> bool:
        """A message that carries the format's own tags could forge turns; the reference refuses it."""
        return any(tag in message["content"] for tag in SPECIAL_TAGS for message in dialog)

    def encode_dialog(self, dialog: Dialog, index: int = 0) -> List[int]:
        _check_messages(dialog, index)
        if dialog[0]["role"] == "system":
            if len(dialog) < 2:
                raise ValueError(f"dialog {index}: a system message must be followed by a user message")
            dialog = [{"role": dialog[1]["role"],
                       "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
        roles = [message["role"] for message in dialog]
        expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(dialog))]
        if roles != expected or roles[-1] != "user":
            raise ValueError(f"dialog {index}: roles must be 'system' (optional), then 'user' and 'assistant' "
                             f"alternating, ending with 'user'; got {roles}")
        tokens: List[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            tokens += self.tokenizer.encode(
                f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True, eos=True)
        tokens += self.tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return tokens


FORMATS = {"llama2": Llama2ChatFormat}


def chat_format(tokenizer):
    """The chat format that goes with this tokenizer's kind."""
    return FORMATS[tokenizer.kind](tokenizer)
