"""What research code does to the model, and how the engine notices it so that its fast ways never skip it:
forward hooks (``hooked``), forwards of its own put in place of the engine's (``replaced``), and weights edited
in place or through ``.data`` (``stamp``, ``WatchedParameter``). Where a hook or a replaced forward
applies, the engine computes as Meta's code does: each module called, with Meta's arguments wherever they can
describe the pass (``Transformer.runs_metas_way``); where a weight was edited, the copies made from it (packed,
fused) are dropped, so every product reads the weight as it is now.
"""

from typing import Callable, Dict, Iterable

import torch
from torch import nn
from torch.nn.modules import module as nn_module


def hook_dicts(modules: Iterable[nn.Module]) -> list:
    """The dicts that hold the forward hooks and pre-hooks that would run on these modules: the two registered
    for every module, then each module's own two. They stay the same objects while hooks come and go, so a
    caller may keep the list and look at it again."""
    return ([nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks]
            + [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)])


def hooked(modules: Iterable[nn.Module]) -> bool:
    """Whether a forward hook or pre-hook waits on any of these modules (its own, or one registered for every
    module). Research code reads and edits activations with them, as on Meta's model; the fused ways skip calling
    some modules (``Fused``, ``PackedFused``, ``Transformer.forward``'s blocks and norms), so while there are
    hooks on them they are called as Meta's code calls them."""
    return any(hook_dicts(modules))


_OWN_FORWARDS: Dict[type, Callable] = {}  # each of the engine's module classes: its forward as written here


def own_forward(cls: type) -> type:
    """A class decorator: cls's forward is the engine's, so that ``replaced`` can tell research code's apart."""
    _OWN_FORWARDS[cls] = cls.forward
    return cls


def replaced(modules: Iterable[nn.Module]) -> bool:
    """Whether research code has changed how any of these modules computes: a forward of its own set on the
    module or on its class, or a module of another class (a subclass of the engine's) put in its place. The fused
    ways skip calling some modules, and call attention with the engine's arguments; such modules are called as
    Meta's code calls them (``Transformer.runs_metas_way``)."""
    return any("forward" in m.__dict__ or _OWN_FORWARDS.get(type(m)) is not type(m).forward for m in modules)


def fused(group, *layers: nn.Module):
    """group (``Fused`` or ``PackedFused``, or None) where it is still the one product of these very layers, else
    None: research code may have put another module in the place of one (a LoRA wrapper around wq, say), which
    must then compute, as in Meta's model."""
    return group if group is not None and group.layers == layers else None


_module_sets = 0
_tensor_sets = 0


def _count_module_set(module: nn.Module, name: str, submodule: nn.Module) -> None:
    global _module_sets
    _module_sets += 1


def _count_tensor_set(*args) -> None:
    global _tensor_sets
    _tensor_sets += 1


nn_module.register_module_module_registration_hook(_count_module_set)
nn_module.register_module_parameter_registration_hook(_count_tensor_set)
nn_module.register_module_buffer_registration_hook(_count_tensor_set)


def apply_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x), for a linear layer or feed-forward of the model, or a module research code put in its place.
    The engine's take activations of any dtype (bf16 weights compute in float32 on CPUs without native bf16);
    a module of research code's whose own weights are in another dtype than x (an nn.Linear, or a LoRA wrapper's
    matrices, made in the checkpoint's bf16, as Meta's model would feed them) is given x in that dtype and gives
    back x's, where torch would fail on the mismatch."""
    if type(layer) in _OWN_FORWARDS:
        return layer(x)
    dtype = next((p.dtype for m in layer.modules() if type(m) not in _OWN_FORWARDS
                  for p in m.parameters(recurse=False) if p.is_floating_point()), x.dtype)
    return layer(x) if dtype == x.dtype else layer(x.to(dtype)).to(x.dtype)


def module_sets() -> int:
    """How many submodules have been set on modules in this process so far (building a model sets its own, and
    research code putting one in the place of another, ``model.layers[0].attention.wq = Wrapper(...)``, one
    more): a CUDA graph captured before such a change would replay the module that was there."""
    return _module_sets


def tensor_sets() -> int:
    """How many parameters and buffers have been set on modules, and tensors given to a WatchedParameter's
    ``.data``, in this process so far (``w.weight = nn.Parameter(...)``, ``load_state_dict(..., assign=True)``,
    ``w.weight.data = t``): a CUDA graph captured before would replay the tensor that was there."""
    return _tensor_sets


class WatchedParameter(nn.Parameter):
    """A parameter that counts the uses of its ``.data``. Writes through ``.data`` (``w.data[i] = 0``, research
    code's way of ablating a neuron) bypass the count of in-place edits that tells a packed copy of the weight, or
    a KV cache kept by ``Llama.stream``, that the weight has changed; so each use of ``.data`` counts as one."""

    @property
    def data(self) -> torch.Tensor:
        self.data_uses = getattr(self, "data_uses", 0) + 1
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        self.data_uses = getattr(self, "data_uses", 0) + 1
        _count_tensor_set()
        torch.Tensor.data.__set__(self, value)

    def __deepcopy__(self, memo: dict) -> nn.Parameter:
        """A copy reads the data without counting it as an edit (and is a plain parameter, as a pickle's is)."""
        if id(self) not in memo:
            data = torch.Tensor.data.__get__(self)
            memo[id(self)] = nn.Parameter(data.clone(memory_format=torch.preserve_format), self.requires_grad)
        return memo[id(self)]

    def __reduce_ex__(self, protocol: int) -> tuple:
        return torch._utils._rebuild_parameter, (torch.Tensor.data.__get__(self), self.requires_grad, {})


def watch(module: nn.Module) -> None:
    """Make every parameter of module and its submodules a WatchedParameter (the same tensor: storage, dtype,
    device and requires_grad kept)."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if not isinstance(p, WatchedParameter):
                setattr(m, name, WatchedParameter(p.detach(), requires_grad=p.requires_grad))


def stamp(t: torch.Tensor) -> tuple:
    """What changes where t's values may have: its memory, its count of in-place edits (None for a tensor made in
    inference mode, which keeps none, and can only be edited in inference mode) and of uses of its ``.data``
    (``WatchedParameter``). A copy made from t (packed) is t's while t's stamp stays the same."""
    return (t.data_ptr(), None if t.is_inference() else t._version, getattr(t, "data_uses", 0))
