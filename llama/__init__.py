"""A from-scratch Llama inference engine that loads Meta's checkpoints as they are."""

from .chat import Dialog, Message
from .generation import Llama
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

__all__ = ["Llama", "Transformer", "ModelArgs", "Tokenizer", "Dialog", "Message"]
