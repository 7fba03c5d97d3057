"""DTensor sharding rules for mlp_ext's ops, and FusedMLP's and GatedFusedMLP's
forward on DTensor weights.

PyTorch's own tensor parallelism (``parallelize_module`` with ColwiseParallel /
RowwiseParallel plans) and FSDP2 with a 2-D mesh turn parameters into DTensors.
DTensor runs an operator only if it knows how the operator's outputs are laid
out for a layout of its inputs; this module tells it, for every mlp_ext op, by
the table ``STRATEGIES`` below (``torch.distributed.tensor.experimental.
register_sharding``, the same API on torch 2.11 and 2.13).

Registration is lazy: ``register()`` runs on the first DTensor call of
FusedMLP or GatedFusedMLP (or fused_mlp / fused_mlp_loss with DTensor weights) and on ``import
mlp_ext.parallel``; ``import mlp_ext`` never imports torch.distributed, which is
slow to import and absent on some builds.
"""
import threading
from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
from torch.distributed.tensor.experimental import register_sharding

__all__ = ["STRATEGIES", "OP_STRATEGIES", "register", "fused_mlp_module_forward",
           "gated_mlp_module_forward"]

R, P = Replicate(), Partial()

# How each named tensor of the ops is laid out over one mesh dimension, in
# each strategy. The names are the ops' own schema names (csrc/ops.cpp): the
# rules read them from the schema, so an op gaining a tensor argument or
# output needs one entry per strategy here (docs/parallel.md, "Dropout under DTensor").
# expand_to_full_mesh_op_strategy combines strategies across mesh dimensions
# (e.g. batch over "dp" and hidden over "tp" on a 2-D mesh).
STRATEGIES: Dict[str, Dict[str, object]] = {
    # Everything whole on every rank: each rank computes the same thing.
    "replicate": dict(
        x=R, target=R, w1=R, w2=R, b1=R, b2=R,
        o=R, s=R, z=R, h=R, mask=R, dropout_mask=R, J=R, dloss_do=R,
        grad_o=R, grad_s=R, grad_J=R,
        dx=R, dw1=R, dw2=R, db1=R, db2=R),
    # The hidden units split (Megatron; ColwiseParallel on fc1, RowwiseParallel
    # on fc2): rank r holds rows of W1 and b1 and the same columns of W2. Its
    # o and s are partial sums over hidden units (both sum over them exactly).
    # b2 must then be Partial too, or it would be added once per rank: from a
    # Replicate b2 DTensor makes b2/n per rank (as it does for addmm's bias);
    # FusedMLP instead adds b2 once, after the sum (exact, no division).
    # grad_s is Replicate: rank r's own s_r gets g_s whole, and its weight
    # gradients g_s lambda W_r are those of its shard. dx is the partial sum
    # G_Z,r W1_r; db2 (row sums of grad_o) is the same on every rank.
    "hidden": dict(
        x=R, w1=Shard(0), w2=Shard(1), b1=Shard(0), b2=P,
        o=P, s=P, z=Shard(1), h=Shard(1), mask=Shard(1), dropout_mask=Shard(1),
        grad_o=R, grad_s=R,
        dx=P, dw1=Shard(0), dw2=Shard(1), db1=Shard(0), db2=R),
    # The batch split (rows of x; weights replicated): weight gradients are
    # partial sums over examples. s is the same on every rank (Replicate), so
    # its gradient must enter the partial weight gradients once in all:
    # grad_s is Partial (a Replicate g_s becomes g_s/n on each rank), so the
    # sum over ranks holds g_s lambda W exactly once. (z and h are (n, hidden)
    # with x's leading dimensions flattened: for an x of more than 2 dimensions
    # their Shard(0) matches x's only when x.shape[0] divides evenly; they are
    # only handed to the backward op, never redistributed.)
    "batch": dict(
        x=Shard(0), w1=R, w2=R, b1=R, b2=R,
        o=Shard(0), s=R, z=Shard(0), h=Shard(0), mask=Shard(0), dropout_mask=Shard(0),
        grad_o=Shard(0), grad_s=P,
        dx=Shard(0), dw1=P, dw2=P, db1=P, db2=P),
}

# The gated block (gated_mlp_*) is the fused one with two first layers: gate and
# up are placed as w1 is (ColwiseParallel on both: rank r holds the same hidden
# units of each, so phi(z_g) * z_u stays local), down as w2; their biases and
# gradients likewise. Its z = [Z_g | Z_u] (n x 2h) shares the fused z's
# placement: under "hidden" each rank's z is [Z_g,r | Z_u,r] of its own shards,
# so the global tensor that Shard(1) declares is [Z_g,0 | Z_u,0 | Z_g,1 | ...],
# the columns of [Z_g | Z_u] permuted (and, for hidden sizes the ranks do not
# divide, not chunked as Shard(1) chunks). That is harmless because z is only
# handed back to gated_mlp_backward under the same strategy, as the local
# shard it came from; it must never be redistributed or read whole.
_GATED_AS_FUSED = dict(
    w_gate="w1", w_up="w1", w_down="w2", b_gate="b1", b_up="b1", b_down="b2",
    dw_gate="dw1", dw_up="dw1", dw_down="dw2", db_gate="db1", db_up="db1", db_down="db2")
for _layout in STRATEGIES.values():
    _layout.update({gated: _layout[fused] for gated, fused in _GATED_AS_FUSED.items()})

# Which strategies each op has. The loss ops need the whole o on one rank (a
# softmax over it) and a mean over the whole batch, so they only run
# replicated; fused_mlp followed by a loss on its output covers the rest.
OP_STRATEGIES: Dict[str, Tuple[str, ...]] = {
    "fused_mlp_forward": ("replicate", "hidden", "batch"),
    "fused_mlp_inference": ("replicate", "hidden", "batch"),
    "fused_mlp_backward": ("replicate", "hidden", "batch"),
    "fused_mlp_loss_forward": ("replicate",),
    "fused_mlp_loss_backward": ("replicate",),
    "gated_mlp_forward": ("replicate", "hidden", "batch"),
    "gated_mlp_inference": ("replicate", "hidden", "batch"),
    "gated_mlp_backward": ("replicate", "hidden", "batch"),
}

# The weights of each op (schema names), first layer first: the layout check
# names them, and the first one's rows are the hidden units.
_WEIGHTS: Dict[str, Tuple[str, ...]] = {
    op: ("w_gate", "w_up", "w_down") if op.startswith("gated_") else ("w1", "w2") for op in OP_STRATEGIES}

# The weight placements each op accepts per mesh dimension, as a tuple in
# _WEIGHTS order. Anything else (w1 split by columns, w2 by rows, w_up placed
# unlike w_gate, Partial weights) is an error, not a silent all_gather: a plan
# that shards the weights the wrong way would otherwise run with every rank
# holding the whole layer.
_WEIGHT_LAYOUTS: Dict[str, Dict[tuple, Tuple[str, ...]]] = {}
for _op, _keys in OP_STRATEGIES.items():
    for _key in _keys:
        _layout = tuple(STRATEGIES[_key][w] for w in _WEIGHTS[_op])
        _WEIGHT_LAYOUTS.setdefault(_op, {})[_layout] = _WEIGHT_LAYOUTS.get(_op, {}).get(_layout, ()) + (_key,)

# What a user should do instead, by the weights' names.
_PLAN_ADVICE = {
    ("w1", "w2"): "Split the hidden layer with ColwiseParallel on fc1 and RowwiseParallel on fc2, "
                  "or replicate both",
    ("w_gate", "w_up", "w_down"): "Split the hidden layer with ColwiseParallel on both the gate and the up "
                                  "Linear (LLaMA's gate_proj, up_proj) and RowwiseParallel on down "
                                  "(down_proj), or replicate all three",
}


def _names(schema_items) -> Tuple[str, ...]:
    return tuple(a.name for a in schema_items)


def _is_tensor_type(t) -> bool:
    if isinstance(t, torch.OptionalType):
        t = t.getElementType()
    return isinstance(t, torch.TensorType)


def _and(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _check_weights(op_name: str, args: Dict[str, object]) -> None:
    """ValueError naming the weights (w1/w2 or w_gate/w_up/w_down), the accepted
    and the actual placements, for a weight layout no strategy of the op has, or
    a split DTensor cannot make (fewer hidden units than ranks)."""
    names = _WEIGHTS[op_name]
    weights = [args.get(name) for name in names]
    if any(w is None or not hasattr(w, "placements") for w in weights):
        return
    accepted = _WEIGHT_LAYOUTS[op_name]
    for dim, layout in enumerate(zip(*(w.placements for w in weights))):
        if layout not in accepted:
            want = ", ".join(f"({', '.join(f'{n} {p!r}' for n, p in zip(names, a))}) ({', '.join(k)})"
                             for a, k in accepted.items())
            got = _and([f"{n} {p!r}" for n, p in zip(names, layout)])
            each = ", ".join(f"{n} placements {tuple(w.placements)}" for n, w in zip(names, weights))
            raise ValueError(
                f"mlp_ext.{op_name} on DTensors: on mesh dimension {dim} expected the weights placed as "
                f"one of {want}, but got {got} ({each}). {_PLAN_ADVICE[names]}"
                + ("; the loss ops need replicated weights (use fused_mlp and a loss on o)"
                   if set(p for a in accepted for p in a) == {R} else ""))
        if layout[0] == Shard(0):
            hidden, ranks = weights[0].tensor_meta.shape[0], weights[0].mesh.size(dim)
            if hidden < ranks:
                raise ValueError(
                    f"mlp_ext.{op_name} on DTensors: {names[0]} is split by hidden units over mesh dimension "
                    f"{dim} of {ranks} ranks, but has only hidden_features = {hidden}; DTensor cannot run a "
                    "shard with no rows (expected hidden_features >= the mesh dimension's size)"
                    + (". mlp_ext.parallel.TensorParallelFusedMLP lets ranks hold no hidden units"
                       if names == ("w1", "w2") else ""))


def _rules(op_name: str, arg_names: Sequence[str], tensor_args: Sequence[bool],
           return_names: Sequence[str]):
    def rules(*args, **kwargs):
        named = dict(zip(arg_names, args))
        named.update(kwargs)
        _check_weights(op_name, named)
        strategies = []
        for key in OP_STRATEGIES[op_name]:
            layout = STRATEGIES[key]
            # Without dropout the mask output is an empty tensor: nothing to split.
            outputs = [R if name == "mask" and not named.get("dropout") else layout[name]
                       for name in return_names]
            # None for non-tensor arguments and for absent optional tensors
            # (b1/b2 None, grad_s None, h None when save_hidden=False).
            inputs = [layout[name] if is_tensor and named.get(name) is not None else None
                      for name, is_tensor in zip(arg_names, tensor_args)]
            strategies.append((outputs, inputs))
        return strategies

    return rules


_lock = threading.Lock()
_registered = False


def register() -> None:
    """Registers the sharding rules of every mlp_ext op with DTensor (once)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        for op_name in OP_STRATEGIES:
            op = getattr(torch.ops.mlp_ext, op_name).default
            schema = op._schema
            arg_names = _names(schema.arguments)
            tensor_args = tuple(_is_tensor_type(a.type) for a in schema.arguments)
            return_names = _names(schema.returns)
            for key in OP_STRATEGIES[op_name]:  # every tensor has a placement in every strategy
                missing = [n for n, t in zip(arg_names, tensor_args) if t and n not in STRATEGIES[key]]
                missing += [n for n in return_names if n not in STRATEGIES[key]]
                if missing:
                    raise RuntimeError(f"mlp_ext: the {key!r} sharding strategy of {op_name} has no placement "
                                       f"for {missing}; add them to mlp_ext._dtensor.STRATEGIES")
            register_sharding(op)(_rules(op_name, arg_names, tensor_args, return_names))
            # register_sharding leaves every non-tensor argument out of DTensor's
            # cache key of sharding decisions (it keys only from the first int
            # argument on; these ops have none). But output_mask decides which
            # outputs exist (a decision cached for one mask breaks the next call
            # with another), so key on all of them, from the first non-tensor one.
            # (op_to_schema_info is where register_sharding itself puts it, on
            # torch 2.11 and 2.13.)
            first_static = next(i for i, t in enumerate(tensor_args) if not t)
            propagator = DTensor._op_dispatcher.sharding_propagator
            propagator.op_to_schema_info[op] = RuntimeSchemaInfo(static_argnum=first_static, needs_pytree=True)
        _registered = True


def _reduce_partial(t: DTensor) -> DTensor:
    """t with every Partial mesh dimension summed (an all_reduce), others kept."""
    if not any(p.is_partial() for p in t.placements):
        return t
    return t.redistribute(t.device_mesh, [R if p.is_partial() else p for p in t.placements])


def fused_mlp_module_forward(mlp, x: Tensor, w1: DTensor, w2, b1, b2, return_penalty: bool):
    """FusedMLP.forward when its weights are DTensors, e.g. after
    ``parallelize_module(mlp, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})``
    (see _module_forward)."""
    from .functional import fused_mlp

    def call(x, b2, weight_decay):
        return fused_mlp(x, w1, w2, b1, b2, activation=mlp.activation, weight_decay=weight_decay,
                         save_hidden=mlp.save_hidden, dropout=mlp.dropout, training=mlp.training)

    return _module_forward(mlp, x, w2, b2, return_penalty, call)


def gated_mlp_module_forward(mlp, x: Tensor, w_gate: DTensor, w_up, w_down, b_gate, b_up, b_down,
                             return_penalty: bool):
    """GatedFusedMLP.forward when its weights are DTensors, e.g. after
    ``parallelize_module(mlp, mesh, {"gate_proj": ColwiseParallel(), "up_proj":
    ColwiseParallel(), "down_proj": RowwiseParallel()})``, LLaMA's plan (see
    _module_forward)."""
    from .gated import gated_mlp

    def call(x, b_down, weight_decay):
        return gated_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation=mlp.activation,
                         weight_decay=weight_decay, save_hidden=mlp.save_hidden)

    return _module_forward(mlp, x, w_down, b_down, return_penalty, call)


def _module_forward(mlp, x: Tensor, w_out: DTensor, b_out, return_penalty: bool, call):
    """A fused block's forward on DTensor weights; ``call(x, b_out or None,
    weight_decay)`` runs its op and returns (o, s), ``w_out`` and ``b_out`` are
    its output layer's weight and bias.

    The plan's hooks sit on the Linear children's forward, which the fused block
    never calls, so this does what the plan's defaults do for the unfused
    layers: a plain x is taken as Replicate on the weights' mesh, and o comes
    back as a plain tensor, all-reduced (the same on every rank); s likewise. A
    DTensor x is used as it is (Shard(0): batch split) and o (and s) come back
    as DTensors with nothing left Partial. s is computed (and reduced) for
    return_penalty or an open ``mlp_ext.collect_penalty()``, as on plain tensors.
    """
    from . import penalty

    register()
    collector = penalty._ACTIVE[-1] if penalty._ACTIVE and mlp.weight_decay else None
    mesh = w_out.device_mesh
    local = not isinstance(x, DTensor)
    if local:
        x = DTensor.from_local(x, mesh, [R] * mesh.ndim, run_check=False)
    # With the hidden units split, o is Partial: add the output bias once after
    # the sum (exact) rather than b/n on every rank.
    split = any(p == Shard(1) for p in w_out.placements)
    penalized = return_penalty or collector is not None
    o, s = call(x, None if split else b_out, mlp.weight_decay if penalized else 0.0)
    o = _reduce_partial(o)
    if split and b_out is not None:
        o = o + b_out
    if penalized:
        s = _reduce_partial(s)
    if local:
        o, s = o.to_local(), s.to_local()
    if collector is not None:
        collector.add(s)
    return (o, s) if return_penalty else o
