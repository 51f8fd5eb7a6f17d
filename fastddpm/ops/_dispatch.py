"""The private CPython and PyTorch interfaces fastddpm.ops reads on every op call, kept in one place.

Each is a cheaper way to ask something a public API also answers; they run on every call of every op, where
the public ways cost several times a small op's kernel. When one of them changes, this is the file to mend.
"""

from __future__ import annotations

import os

import torch

# ---- the environment as choose_backend reads it
# os.environ.get raises and catches a KeyError inside for an unset variable (the usual case). On POSIX,
# os.environ keeps its contents in a dict of bytes (``_data``) that every assignment or deletion through
# os.environ updates, which a plain lookup reads. Elsewhere, or for an os.environ replaced by another mapping,
# os.environ.get.
_ENVIRON_TYPE = type(os.environ)
_POSIX_ENVIRON = os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict)


def _env_bytes(name: str) -> bytes | None:
    value = os.environ.get(name)
    return None if value is None else os.fsencode(value)


def backend_environment() -> tuple[bytes | None, bytes | None]:
    """FASTDDPM_BACKEND and TRITON_INTERPRET as bytes (None where unset)."""
    environ = os.environ
    if _POSIX_ENVIRON and type(environ) is _ENVIRON_TYPE:
        data = environ._data
        return data.get(b"FASTDDPM_BACKEND"), data.get(b"TRITON_INTERPRET")
    return _env_bytes("FASTDDPM_BACKEND"), _env_bytes("TRITON_INTERPRET")


# ---- what may see an op call
# The innermost torch.func transform (grad, vjp, vmap, ...) in effect, or None outside them.
peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack
# How many TorchDispatchModes are active (0: none).
dispatch_mode_depth = torch._C._len_torch_dispatch_stack

# Whether torch.library.wrap_triton takes the Triton interpreter's kernels (TRITON_INTERPRET=1, CPU tensors):
# before torch 2.13 it refuses them.
WRAP_TRITON_TAKES_INTERPRETED = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


def graph_building_mode_active() -> bool:
    """Whether an active TorchDispatchMode builds a graph from the ops it sees (make_fx's proxy mode, fake or
    functional tensors): a Triton kernel launched under it must go through wrap_triton to become a node. Other
    modes (a logger, a FLOP counter) watch real tensors, which a direct launch computes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    building = (ProxyTorchDispatchMode, FakeTensorMode, FunctionalTensorMode)
    return any(isinstance(mode, building) for mode in _get_current_dispatch_mode_stack())


# ---- the dispatcher below its autograd layer
# A context manager under which an op call skips the autograd kernel and runs the backend kernel directly.
BelowAutograd = torch._C._AutoDispatchBelowAutograd


# ---- a schedule's tables
# Attribute access finds an nn.Module's buffer only after the usual lookup fails, in Module.__getattr__
# (Python), several times the cost of the dict lookup it ends in. A buffer's name holds no other attribute
# (register_buffer refuses a name that exists), so reading the buffer dict gives the same tensor.
_NO_DICT: dict = {}


def buffers(obj, name_a: str, name_b: str) -> tuple:
    """(obj.name_a, obj.name_b), from obj's buffer dict where obj is an nn.Module holding both as buffers."""
    held = getattr(obj, "__dict__", _NO_DICT).get("_buffers")
    if held is not None:
        a, b = held.get(name_a), held.get(name_b)
        if a is not None and b is not None:
            return a, b
    return getattr(obj, name_a), getattr(obj, name_b)
