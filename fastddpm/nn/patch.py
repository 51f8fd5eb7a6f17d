"""fastddpm.patch(model): fuse every GroupNorm that is immediately followed by SiLU into GroupNormSiLU, in
place.

Three patterns are recognised:

1. ``nn.Sequential(..., nn.GroupNorm, nn.SiLU, ...)``: the GroupNorm becomes a GroupNormSiLU and the SiLU an
   ``nn.Identity`` at the same index, so the state_dict keys stay the same.
2. Attribute pairs in a module's ``forward``: ``x = self.norm(x); x = self.act(x)`` or
   ``self.act(self.norm(x))`` (UNet2DModel's ``conv_norm_out``/``conv_act``, ``norm``/``act`` blocks).
3. Blocks that call one activation module after several norms and on other inputs as well, such as diffusers'
   ResnetBlock2D (``norm1``→``nonlinearity``, ``norm2``→``nonlinearity``, and ``nonlinearity(temb)`` feeding
   ``time_emb_proj``): both norms are fused, the activation of ``temb`` moves into the Linear that consumes it
   (:class:`SiLULinear`, same parameters), and ``nonlinearity`` becomes an ``nn.Identity``.

Patterns 2 and 3 read the source of the module's ``forward`` (``ast``; nothing is compiled or executed):
branches whose condition depends only on the module's own attributes (``self.time_embedding_norm ==
"default"``, ``self.time_emb_proj is not None``) are resolved with the instance's values, then every call of
an activation module must either directly follow a fusable GroupNorm (the statement just before it, in every
branch that leads there) or feed a single Linear whose input it is. A module with any other use of the
activation, or of the norm, is left as it is: a structure that is not recognised is never patched.

Only exact ``nn.GroupNorm`` and ``nn.SiLU`` instances are fused (diffusers' ``get_activation("silu")``
returns an ``nn.SiLU``), only modules referenced once in the model, and only where the module's class
``forward`` is used. Modules are changed by swapping their class (``GroupNorm`` → ``GroupNormSiLU``,
``Linear`` → ``SiLULinear``), so parameters, buffers, hooks and devices stay the very same objects. Patch
after configuring a model: a branch resolved at patch time is not re-checked later.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from fastddpm.nn.group_norm_silu import GroupNormSiLU

__all__ = ["patch", "SiLULinear"]


class SiLULinear(nn.Linear):
    """Linear(SiLU(x)): an ``nn.Linear`` that applies SiLU to its input first (same parameters and keys).

    :func:`patch` moves a block's activation of an input into the Linear that consumes it, so that the block's
    shared activation module can become an identity after its norms are fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(x), self.weight, self.bias)


def patch(model: nn.Module) -> int:
    """Replace, in place, each GroupNorm immediately followed by SiLU with a GroupNormSiLU; returns how many.

    Weights are kept (the very same Parameter objects) and state_dict keys do not change. A model with nothing
    to fuse is returned unchanged, with 0. See the module docstring for the recognised patterns.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch needs an nn.Module, got {type(model).__name__}")
    references = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    fused = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            fused += _patch_sequential(module, references)
        else:
            fused += _patch_forward(module, references)
    return fused


def _is_norm(module, references) -> bool:
    return type(module) is nn.GroupNorm and references[id(module)] == 1


def _is_silu(module) -> bool:
    return type(module) is nn.SiLU


def _patch_sequential(seq: nn.Sequential, references) -> int:
    fused = 0
    keys = list(seq._modules)
    for key, next_key in zip(keys, keys[1:]):
        norm, act = seq._modules[key], seq._modules[next_key]
        if _is_norm(norm, references) and _is_silu(act):
            norm.__class__ = GroupNormSiLU
            seq._modules[next_key] = nn.Identity()
            fused += 1
    return fused


# ----------------------------------------------------------------------------- forward analysis
class _Unrecognised(Exception):
    """The forward does something the analysis does not understand: leave the module alone."""


@functools.lru_cache(maxsize=256)
def _parse_forward(function) -> ast.FunctionDef | None:
    if hasattr(function, "__wrapped__"):
        return None
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    if not tree.body or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    node = tree.body[0]
    if isinstance(node, ast.AsyncFunctionDef) or not node.args.args:
        return None
    return node


_UNKNOWN = object()
_PLAIN = (str, int, float, bool, type(None))


def _static(expr, module, self_name):
    """The value of ``expr`` when it depends only on the module's attributes and constants, else _UNKNOWN."""
    if isinstance(expr, ast.Constant):
        return expr.value
    if isinstance(expr, ast.Name):
        return module if expr.id == self_name else _UNKNOWN
    if isinstance(expr, ast.Attribute):
        base = _static(expr.value, module, self_name)
        if base is _UNKNOWN or isinstance(base, torch.Tensor):
            return _UNKNOWN
        try:
            return getattr(base, expr.attr)
        except AttributeError:
            return _UNKNOWN
    if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not):
        value = _static(expr.operand, module, self_name)
        truth = _truth(value)
        return _UNKNOWN if truth is _UNKNOWN else not truth
    if isinstance(expr, ast.BoolOp):
        truths = [_truth(_static(v, module, self_name)) for v in expr.values]
        if any(t is _UNKNOWN for t in truths):
            return _UNKNOWN
        return all(truths) if isinstance(expr.op, ast.And) else any(truths)
    if isinstance(expr, ast.Compare) and len(expr.ops) == 1:
        left = _static(expr.left, module, self_name)
        right = _static(expr.comparators[0], module, self_name)
        if left is _UNKNOWN or right is _UNKNOWN:
            return _UNKNOWN
        op = expr.ops[0]
        if isinstance(op, ast.Is):
            return left is right
        if isinstance(op, ast.IsNot):
            return left is not right
        if isinstance(left, _PLAIN) and isinstance(right, _PLAIN):
            if isinstance(op, ast.Eq):
                return left == right
            if isinstance(op, ast.NotEq):
                return left != right
        if isinstance(left, _PLAIN) and isinstance(right, (tuple, list, set, frozenset)) \
                and all(isinstance(v, _PLAIN) for v in right):
            if isinstance(op, ast.In):
                return left in right
            if isinstance(op, ast.NotIn):
                return left not in right
        return _UNKNOWN
    if isinstance(expr, (ast.Tuple, ast.List)):
        values = [_static(v, module, self_name) for v in expr.elts]
        return _UNKNOWN if any(v is _UNKNOWN for v in values) else tuple(values)
    return _UNKNOWN


def _truth(value):
    if value is _UNKNOWN or isinstance(value, torch.Tensor):
        return _UNKNOWN
    try:
        return bool(value)
    except Exception:  # noqa: BLE001 - an object without a usable truth value
        return _UNKNOWN


def _prune(statements, module, self_name):
    """Statements with every ``if`` whose test is static replaced by the branch it takes (recursively)."""
    out = []
    for stmt in statements:
        if isinstance(stmt, ast.If):
            truth = _truth(_static(stmt.test, module, self_name))
            if truth is not _UNKNOWN:
                out.extend(_prune(stmt.body if truth else stmt.orelse, module, self_name))
                continue
            stmt = ast.If(test=stmt.test, body=_prune(stmt.body, module, self_name),
                          orelse=_prune(stmt.orelse, module, self_name))
        elif isinstance(stmt, (ast.For, ast.While)):
            stmt = type(stmt)(**{**{f: getattr(stmt, f) for f in stmt._fields},
                                 "body": _prune(stmt.body, module, self_name),
                                 "orelse": _prune(stmt.orelse, module, self_name)})
        elif isinstance(stmt, ast.With):
            stmt = ast.With(items=stmt.items, body=_prune(stmt.body, module, self_name))
        out.append(stmt)
    return out


def _self_attr(node, self_name):
    """X for a node ``self.X``, else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self_name:
        return node.attr
    return None


def _call_of(node, self_name):
    """(X, the single argument) for a node ``self.X(arg)``, else (None, None)."""
    if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords \
            and not isinstance(node.args[0], ast.Starred):
        name = _self_attr(node.func, self_name)
        if name is not None:
            return name, node.args[0]
    return None, None


def _blocks(statements):
    """Every statement list (block) of the pruned function, the top one first."""
    yield statements
    for stmt in statements:
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(stmt, field, None)
            if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                yield from _blocks(inner)
        for handler in getattr(stmt, "handlers", ()):
            yield from _blocks(handler.body)


def _own_nodes(stmt):
    """The expression nodes of a statement itself, not those of the blocks nested in it."""
    if isinstance(stmt, ast.If) or isinstance(stmt, ast.While):
        return list(ast.walk(stmt.test))
    if isinstance(stmt, ast.For):
        return list(ast.walk(stmt.target)) + list(ast.walk(stmt.iter))
    if isinstance(stmt, ast.With):
        return [n for item in stmt.items for n in ast.walk(item)]
    if isinstance(stmt, ast.Try):
        return []
    return list(ast.walk(stmt))


def _exits(stmt):
    """The simple statements that may run last in ``stmt`` before control moves on; None when unknown."""
    if isinstance(stmt, ast.If):
        if not stmt.body or not stmt.orelse:
            return None
        body, orelse = _exits(stmt.body[-1]), _exits(stmt.orelse[-1])
        return None if body is None or orelse is None else body + orelse
    if isinstance(stmt, (ast.Assign, ast.Expr, ast.AugAssign, ast.AnnAssign)):
        return [stmt]
    return None


def _assigned_name(stmt):
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    return None


def _plan(module, references):
    """(norms to fuse, linears to prefix with SiLU, activation attributes to make identities), or None."""
    children = module._modules
    if not any(_is_silu(m) for m in children.values()) or not any(_is_norm(m, references)
                                                                   for m in children.values()):
        return None
    if "forward" in module.__dict__:
        return None
    function = type(module).forward
    if function is nn.Module.forward:
        return None
    node = _parse_forward(function)
    if node is None:
        return None
    self_name = node.args.args[0].arg
    body = _prune(node.body, module, self_name)

    # Every reference to self.<child> in the pruned forward, and which of them are calls.
    uses: dict[str, list] = {}
    calls: dict[int, ast.Call] = {}
    for block in _blocks(body):
        for stmt in block:
            for n in _own_nodes(stmt):
                if isinstance(n, ast.Call) and _self_attr(n.func, self_name) is not None:
                    calls[id(n.func)] = n
                name = _self_attr(n, self_name)
                if name is not None and name in children:
                    uses.setdefault(name, []).append(n)
    activations = [name for name, m in children.items() if _is_silu(m) and name in uses]
    if not activations:
        return None

    fused_norm_calls: set[int] = set()  # id of each self.norm(...) call whose output goes straight into SiLU
    norms, linears = set(), set()
    for act in activations:
        for ref in uses[act]:
            call = calls.get(id(ref))
            if call is None or _call_of(call, self_name)[0] != act:
                raise _Unrecognised(f"self.{act} is used other than as a call with one argument")
    for block in _blocks(body):
        for index, stmt in enumerate(block):
            for n in _own_nodes(stmt):
                act, arg = _call_of(n, self_name)
                if act not in activations:
                    continue
                # (a) self.act(self.norm(x))
                inner, _ = _call_of(arg, self_name)
                if inner is not None and _is_norm(children.get(inner), references):
                    fused_norm_calls.add(id(arg))
                    norms.add(inner)
                    continue
                if not isinstance(arg, ast.Name):
                    raise _Unrecognised(f"self.{act} is applied to an expression")
                var = arg.id
                whole = ((isinstance(stmt, ast.Assign) and stmt.value is n and _assigned_name(stmt) == var)
                         or (isinstance(stmt, ast.Return) and stmt.value is n))
                if not whole:
                    raise _Unrecognised(f"self.{act}({var}) is part of a larger statement")
                # (b) var = self.norm(...) just before, on every path
                previous = _exits(block[index - 1]) if index > 0 else None
                producers = []
                for p in previous or ():
                    name, _ = _call_of(p.value, self_name) if isinstance(p, ast.Assign) else (None, None)
                    if (_assigned_name(p) == var and name is not None
                            and _is_norm(children.get(name), references)):
                        producers.append((name, p.value))
                    else:
                        producers = None
                        break
                if producers:
                    for name, call in producers:
                        fused_norm_calls.add(id(call))
                        norms.add(name)
                    continue
                # (c) the activated input feeds one Linear only:
                #     var = self.act(var); y = ...self.linear(var)...
                following = block[index + 1] if index + 1 < len(block) else None
                linear = _feeding_linear(following, var, children, references, uses, self_name)
                if linear is None or not isinstance(stmt, ast.Assign):
                    raise _Unrecognised(f"self.{act}({var}) neither follows a GroupNorm nor feeds a Linear")
                linears.add(linear)
    if not norms:
        return None
    for name in norms:  # a norm whose output is used without the activation too cannot be fused
        for ref in uses[name]:
            call = calls.get(id(ref))
            if call is None or id(call) not in fused_norm_calls:
                raise _Unrecognised(f"self.{name} is used without a SiLU after it")
    return norms, linears, activations


def _feeding_linear(stmt, var, children, references, uses, self_name):
    """L when ``stmt`` is ``var = <expr>`` whose only read of ``var`` is the argument of ``self.L(var)``, L a
    plain nn.Linear called nowhere else; else None."""
    if stmt is None or _assigned_name(stmt) != var:
        return None
    reads = [n for n in ast.walk(stmt.value) if isinstance(n, ast.Name) and n.id == var]
    if len(reads) != 1:
        return None
    for n in ast.walk(stmt.value):
        name, arg = _call_of(n, self_name)
        if name is not None and arg is reads[0]:
            linear = children.get(name)
            if type(linear) is nn.Linear and references[id(linear)] == 1 and len(uses.get(name, ())) == 1:
                return name
    return None


def _patch_forward(module: nn.Module, references) -> int:
    try:
        plan = _plan(module, references)
    except _Unrecognised:
        return 0
    if plan is None:
        return 0
    norms, linears, activations = plan
    for name in norms:
        module._modules[name].__class__ = GroupNormSiLU
    for name in linears:
        module._modules[name].__class__ = SiLULinear
    for name in activations:
        module._modules[name] = nn.Identity()
    return len(norms)
