"""A from-scratch Llama inference engine that loads Meta's checkpoints as they are."""

import torch

if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 6):
    # torch 2.5's gloo ran collectives on threads outside the caller's inference mode: any run of several
    # processes failed in its first step, with an error that says nothing of the version.
    raise ImportError(f"llama needs torch 2.6 or later, and this is torch {torch.__version__}: "
                      "pip install --upgrade 'torch>=2.6'")

from .chat import Dialog, Message
from .generation import Llama
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

__all__ = ["Llama", "Transformer", "ModelArgs", "Tokenizer", "Dialog", "Message"]
