"""mlp_ext.fuse(model): replace, in place, every MLP block of a model that can be
proven equivalent to a FusedMLP, and report what was replaced and what was not.

A block is a candidate when it is

* an ``nn.Sequential`` of Linear, activation, Linear (no-op modules may stand
  between and after them), or
* any module whose direct children are exactly two ``nn.Linear`` (any names:
  CLIP's / SigLIP's ``fc1, activation_fn, fc2``, timm's ``fc1, act, drop1, norm,
  fc2, drop2``; T5's ``wi, act, dropout, wo``), one activation (a child module, or
  a function held as an attribute), at most one ``nn.Dropout`` with p > 0 (the
  hidden-layer dropout, see below) and otherwise only no-op modules:
  ``nn.Identity`` and dropout with ``p == 0``.

It is **replaced** only when all of these hold (otherwise it is left alone and
the report says why):

1. structure: no parameters or buffers besides the two Linears' (a LayerNorm
   between them, a learned activation, an attention sub-layer: refused), the
   Linears chain (``fc1.out_features == fc2.in_features``), both or neither have a
   bias, no hooks on the block or its children (the fused op would bypass them), no
   parametrized Linear weights; dropout with p > 0 only as one plain
   ``nn.Dropout`` (``inplace`` or not): two of them, or ``Dropout1d/2d/3d``,
   ``AlphaDropout``, ``FeatureAlphaDropout`` with p > 0 (other math) are refused;
2. the activation is recognised (``mlp_ext.resolve_activation``);
3. the probe: the block's own ``forward`` is run, in ``train()`` and in ``eval()``
   mode, in float64 on the parameters' device with **random** weights of the
   Linears' shapes (``torch.func.functional_call``; the real weights are not used,
   so a zero-initialized layer cannot hide a difference), on a random input of
   shape (2, 3, in_features), and must agree with ``fused_mlp`` to 1e-10 relative.
   The random numbers come from a private generator and, inside
   ``torch.random.fork_rng``, from generators seeded for the probe: the caller's
   RNG state is untouched.
4. with an ``nn.Dropout(p)``, p > 0: the probe also establishes where it acts. In
   train mode the forward must call it exactly once, on ``phi(fc1(x))``, and return
   ``fc2`` of its output (checked with temporary hooks on the dropout, whatever
   mask it draws); that is ``FusedMLP(dropout=p)``'s math. On the CPU the train-mode
   output is moreover compared with ``fused_mlp(..., dropout=p)`` under the same
   seed (the op's CPU mask is bit-identical to nn.Dropout's); on CUDA the op's mask
   is its own (Philox) draw, so there the train-mode check is the structural one
   and the outputs are compared in eval mode only. A dropout after ``fc2`` with
   p > 0 (timm's ``drop2``), or before ``fc1``, is refused with the reason.

The replacement is ``FusedMLP.from_linears`` with the block's own Linear modules
under the block's own names (and ``dropout=p`` for a hidden-layer dropout), so the
parameters (identity, optimizer state), ``state_dict()`` keys and everything that
saves and loads by them (``save_pretrained`` / ``from_pretrained``, checkpoints) are
unchanged. The activation and dropout modules hold no state and go; the FusedMLP
follows ``train()`` / ``eval()`` as they did (dropout in training only).

Not replaced (reported): a Linear-activation-Linear run inside a longer
``nn.Sequential`` (replacing it would renumber the keys of what follows), blocks
whose forward does more than the composition (a residual, a scale), the root
module itself (use ``mlp_ext.fused_block(block)``, which proves and
converts one block).

Gated blocks (transformers' LlamaMLP, MistralMLP, Qwen2MLP, GemmaMLP,
T5DenseGatedActDense; timm's SwiGLU): a module whose direct children are exactly
three ``nn.Linear``, two of one shape (gate and up) feeding the third (down), one
activation and otherwise no-ops (no dropout with p > 0: GatedFusedMLP has none),
under the same rules 1-2, is proven by the same
probe against ``mlp_ext.gated_mlp`` -- which of the two is the gate is whichever
order the probe confirms -- and replaced by ``GatedFusedMLP.from_linears`` under
the block's own names (``fused_gated_block`` converts one block).
"""
import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .activations import resolve_activation
from .functional import check_module_options, fused_mlp
from .gated import gated_mlp
from .gated import GatedFusedMLP
from .modules import FusedMLP

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout)
_PROBE_RTOL = 1e-10
_PROBE_SEED = 0x5EED


class NotFusable(ValueError):
    """A module that is not provably an MLP block (the message says why)."""


@dataclasses.dataclass
class Replaced:
    name: str             # qualified name in the model
    block: str            # the class of the replaced module
    activation: str       # canonical name
    linears: Tuple[str, ...]   # (fc1, fc2), or (gate, up, down) for a gated block
    shape: Tuple[int, int, int]   # (in, hidden, out)
    dropout: float = 0.0       # p of the hidden-layer dropout (FusedMLP's dropout=p)


@dataclasses.dataclass
class Skipped:
    name: str
    block: str
    reason: str


@dataclasses.dataclass
class FuseReport:
    replaced: List[Replaced] = dataclasses.field(default_factory=list)
    skipped: List[Skipped] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"mlp_ext.fuse: {len(self.replaced)} block(s) replaced, "
                 f"{len(self.skipped)} skipped"]
        for r in self.replaced:
            if len(r.linears) == 3:   # a gated block: gate, up, down
                what = f"{r.linears[2]}({r.activation}({r.linears[0]}) * {r.linears[1]})"
            else:
                dropout = f" -> dropout(p={r.dropout})" if r.dropout else ""
                what = f"{r.linears[0]} -> {r.activation}{dropout} -> {r.linears[1]}"
            lines.append(f"  replaced {r.name} ({r.block}): {what}, "
                         f"{r.shape[0]}x{r.shape[1]}x{r.shape[2]}")
        for s in self.skipped:
            lines.append(f"  skipped  {s.name} ({s.block}): {s.reason}")
        return "\n".join(lines)


def _has_state(module: nn.Module) -> List[str]:
    return ([n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()])


def _hooks(module: nn.Module) -> List[str]:
    names = ["_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"]
    return [n.strip("_") for n in names if getattr(module, n, None)]


def _is_noop(module: nn.Module) -> Optional[bool]:
    """True for modules that are the identity in train and eval mode, False for a
    dropout that is not, None for anything else."""
    if type(module) is nn.Identity:
        return True
    if isinstance(module, _DROPOUTS):
        return module.p == 0
    return None


def _linear_children(block: nn.Module) -> List[Tuple[str, nn.Linear]]:
    return [(n, c) for n, c in block.named_children() if isinstance(c, nn.Linear)]


def _is_candidate(block: nn.Module) -> bool:
    return len(_linear_children(block)) == 2


def _plan(block: nn.Module) -> Tuple[str, str, str, Optional[str]]:
    """(name of fc1, activation, name of fc2, name of the nn.Dropout with p > 0 or
    None) of a candidate block, or NotFusable. Where the dropout acts is left to
    the probe (_check_hidden_dropout): the children's order cannot tell."""
    linears = _linear_children(block)
    if len(linears) != 2:
        raise NotFusable(f"has {len(linears)} Linear children, not 2")
    activation, dropout = _plan_structure(block, linears, hidden_dropout=True)
    (n1, l1), (n2, l2) = linears
    chains = [(a, b) for (a, la), (b, lb) in ((linears[0], linears[1]), (linears[1], linears[0]))
              if la.out_features == lb.in_features]
    if not chains:
        raise NotFusable(f"the Linears do not chain ({n1}: {l1.in_features}->{l1.out_features}, "
                         f"{n2}: {l2.in_features}->{l2.out_features})")
    first, second = chains[0]   # both chain (square): registration order
    _check_linear_weights([l for _, l in linears])
    return first, activation, second, dropout


def _plan_structure(block: nn.Module, linears: List[Tuple[str, nn.Linear]], *,
                    hidden_dropout: bool) -> Tuple[str, Optional[str]]:
    """The checks of rule 1 and 2 that do not depend on how the Linears connect;
    returns the activation (canonical name) and the name of the one nn.Dropout with
    p > 0 (None if none), which only a block with hidden_dropout may have."""
    others = [(n, c) for n, c in block.named_children() if not isinstance(c, nn.Linear)]
    stateful = [n for n, c in others if _has_state(c)]
    if stateful:
        raise NotFusable("holds other modules with parameters or buffers "
                         f"({', '.join(stateful)}): not only Linear -> activation -> Linear")
    own = [n for n, _ in block.named_parameters(recurse=False)] + [
        n for n, _ in block.named_buffers(recurse=False)]
    if own:
        raise NotFusable(f"holds its own parameters or buffers ({', '.join(own)})")
    hooks = _hooks(block)
    for n, c in others:   # the activation and dropout go: hooks on them would stop firing
        hooks += [f"{n}.{h}" for h in _hooks(c)]
    for n, c in linears:
        hooks += [f"{n}.{h}" for h in _hooks(c)]
        if torch.nn.utils.parametrize.is_parametrized(c):
            raise NotFusable(f"{n} has parametrized weights")
        if type(c) is not nn.Linear:
            raise NotFusable(f"{n} is a {type(c).__name__}, a subclass of nn.Linear")
    if hooks:
        raise NotFusable(f"has hooks the fused op would bypass ({', '.join(hooks)})")
    activations, identities, dropouts = [], [], []
    for n, c in others:
        noop = _is_noop(c)
        if noop is True:
            identities.append(n)
            continue
        if noop is False:
            if not hidden_dropout:
                raise NotFusable(f"{n} = {c!r} is not a no-op in training (dropout p > 0), and "
                                 "GatedFusedMLP has no dropout")
            # FusedMLP's dropout is nn.Dropout's math: elementwise, scaled by 1 / (1 - p).
            # Dropout1d/2d/3d drop whole channels, the alpha dropouts keep SELU's
            # statistics with other values: not that math, whatever the probe says.
            # inplace=True changes only where nn.Dropout writes (over phi(z), a temporary
            # of the block's forward), not its mask or values: the same math.
            if type(c) is not nn.Dropout:
                raise NotFusable(f"{n} = {c!r} is not a no-op in training (dropout p > 0), and only "
                                 "a plain nn.Dropout is FusedMLP's hidden-layer dropout")
            dropouts.append(n)
            continue
        try:
            activations.append((n, resolve_activation(c, where="fuse", argument=n)))
        except (TypeError, ValueError) as e:
            raise NotFusable(str(e)) from None
    if not activations:
        # A function held as an attribute (self.act = F.gelu).
        for n, value in vars(block).items():
            if n.startswith("_") or isinstance(value, (nn.Module, Tensor, type)) or not callable(value):
                continue
            try:
                activations.append((n, resolve_activation(value, where="fuse", argument=n)))
            except (TypeError, ValueError):
                pass
    if len(activations) > 1:
        names = [n for n, a in activations if a != "identity"]
        if len(names) > 1:
            raise NotFusable(f"has more than one activation ({', '.join(names)})")
        activations = [(n, a) for n, a in activations if a != "identity"]
    if len(dropouts) > 1:
        raise NotFusable(f"has {len(dropouts)} dropouts with p > 0 ({', '.join(dropouts)}): "
                         "FusedMLP has one, between the activation and the second Linear")
    return (activations[0][1] if activations else "identity"), (dropouts[0] if dropouts else None)


def _check_linear_weights(layers: List[nn.Linear], same_bias: bool = True) -> None:
    """All with a bias or none (where same_bias; the gated op takes each bias or
    None); one dtype and device the operator takes."""
    fc1 = layers[0]
    if same_bias and len({layer.bias is None for layer in layers}) != 1:
        raise NotFusable("one Linear has a bias and another not")
    if any(layer.weight.dtype != fc1.weight.dtype or layer.weight.device != fc1.weight.device
           for layer in layers):
        raise NotFusable("the Linears differ in dtype or device")
    if fc1.weight.device.type == "meta":
        raise NotFusable("its parameters are on the meta device")
    if not fc1.weight.is_floating_point():
        raise NotFusable(f"its weights are {fc1.weight.dtype}")


def _verify(block: nn.Module, first: str, activation: str, second: str,
            dropout: Optional[str]) -> None:
    """Run the block's own forward on random float64 weights and input (train and
    eval mode) against fused_mlp; NotFusable when they differ. With a hidden-layer
    dropout (the name of an nn.Dropout with p > 0), first establish where it acts."""
    fc1, fc2 = block._modules[first], block._modules[second]
    device = fc1.weight.device
    generator = _probe_generator()
    p = float(block._modules[dropout].p) if dropout is not None else 0.0

    def random(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device)

    d, h, q = fc1.in_features, fc1.out_features, fc2.out_features
    try:
        # Weights of unit gain so that z spans the activations' curved region (|z| ~ 1..3).
        params = {f"{first}.weight": random(h, d, scale=d ** -0.5),
                  f"{second}.weight": random(q, h, scale=h ** -0.5)}
        if fc1.bias is not None:
            params[f"{first}.bias"] = random(h)
            params[f"{second}.bias"] = random(q)
        x = random(2, 3, d, scale=2.0)
        inputs = (x, params[f"{first}.weight"], params[f"{second}.weight"],
                  params.get(f"{first}.bias"), params.get(f"{second}.bias"))
        without_dropout, _ = fused_mlp(*inputs, activation=activation)
    except Exception as e:   # e.g. no float64 on this device
        raise NotFusable(f"the float64 probe cannot run on {device} ({type(e).__name__}: {e})") from None

    def expected(training: bool) -> Optional[Tensor]:
        if not (training and p):
            return without_dropout
        if device.type != "cpu":
            # The CUDA op draws its mask with its own (Philox) kernel, not nn.Dropout's:
            # the same distribution, other numbers. There the train-mode proof is the
            # structure (_check_hidden_dropout) and the outputs are compared in eval mode.
            return None
        # On the CPU the op's mask is nn.Dropout's for the same seed (_probe seeds both).
        return fused_mlp(*inputs, activation=activation, dropout=p)[0]

    description = f"{second}({activation}({first}(x)))"
    if dropout is not None:
        _check_hidden_dropout(block, params, x, first, activation, second, dropout)
        description = f"{second}(dropout({activation}({first}(x)), p={p}))"
    _probe(block, params, x, expected, description)


def _probe_generator():
    return torch.Generator().manual_seed(_PROBE_SEED)


def _forked_rng(device: torch.device):
    """fork_rng of the global CPU generator and, on CUDA, of this device's: what the
    probe draws or seeds there is given back."""
    devices = [] if device.type != "cuda" else [
        device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.fork_rng(devices=devices)


def _relative_error(out: Tensor, expected: Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    return float(((out - expected).abs() / (1 + expected.abs())).max())


def _same_values(out: Optional[Tensor], expected: Tensor) -> bool:
    """out holds expected's values in the same (row-major) order, to _PROBE_RTOL; the
    shape may differ (a forward that flattens x to rows for its Linears)."""
    return (isinstance(out, Tensor) and out.numel() == expected.numel()
            and _relative_error(out.reshape(-1), expected.reshape(-1)) <= _PROBE_RTOL)


def _run(block: nn.Module, params: Dict[str, Tensor], x: Tensor, training: bool) -> Tensor:
    """block's own forward in train or eval mode with params, on a copy of x (the
    caller restores block.training and forks the RNG)."""
    block.train(training)
    try:
        out = torch.func.functional_call(block, params, (x.clone(),))
    except Exception as e:
        raise NotFusable(f"its forward failed on the probe input ({type(e).__name__}: {e})") from None
    if not isinstance(out, Tensor):
        raise NotFusable("its forward does not return one tensor of shape (*, out_features)")
    if out.dtype != torch.float64:
        raise NotFusable(f"its forward returns {out.dtype} for float64 input")
    return out


def _probe(block: nn.Module, params: Dict[str, Tensor], x: Tensor,
           expected: Callable[[bool], Optional[Tensor]], description: str) -> None:
    """Run block's own forward with params (train and eval mode, no grad) on x;
    NotFusable unless it matches expected(training) to _PROBE_RTOL (no comparison
    where that is None). The CPU generator is seeded with _PROBE_SEED before the
    block's forward and again before expected(training), so that a dropout in both
    draws the same mask on the CPU; the caller's RNG state is given back."""
    was_training = block.training
    try:
        with torch.no_grad(), _forked_rng(x.device):
            for mode in (True, False):
                torch.default_generator.manual_seed(_PROBE_SEED)
                out = _run(block, params, x, mode)
                torch.default_generator.manual_seed(_PROBE_SEED)
                want = expected(mode)
                if want is None:
                    continue
                if out.shape != want.shape:
                    raise NotFusable("its forward does not return one tensor of shape (*, out_features)")
                error = _relative_error(out, want)
                if not error <= _PROBE_RTOL:
                    raise NotFusable(f"its forward differs from {description} on "
                                     f"the probe by {error:.3g} ({'train' if mode else 'eval'} mode)")
    finally:
        block.train(was_training)


def _check_hidden_dropout(block: nn.Module, params: Dict[str, Tensor], x: Tensor, first: str,
                          activation: str, second: str, name: str) -> None:
    """Where the block's nn.Dropout `name` acts, on any device: in train mode the
    block's forward must call it once, on phi(first(x)), and return second(its
    output), which is FusedMLP's o = fc2(dropout(phi(fc1(x)))). Temporary hooks record
    the dropout's input and output, so this holds whatever mask it draws (even one
    that drops nothing); NotFusable otherwise."""
    dropout = block._modules[name]
    calls: List[List[Optional[Tensor]]] = []

    def record_input(module, args):
        # A copy: an inplace dropout overwrites its input.
        calls.append([args[0].clone() if args and isinstance(args[0], Tensor) else None])

    def record_output(module, args, output):
        calls[-1].append(output.clone() if isinstance(output, Tensor) else None)

    handles = [dropout.register_forward_pre_hook(record_input),
               dropout.register_forward_hook(record_output)]
    was_training = block.training
    try:
        with torch.no_grad(), _forked_rng(x.device):
            out = _run(block, params, x, True)
    finally:
        for handle in handles:
            handle.remove()
        block.train(was_training)
    only = (f"a dropout with p > 0 is fused only between the activation and {second} "
            f"(FusedMLP's dropout), not after {second} or before {first}")
    if len(calls) != 1:
        raise NotFusable(f"its forward calls {name} = {dropout!r} {len(calls)} times in train mode, "
                         f"not once: {only}")
    hidden_in, hidden_out = calls[0]
    hidden = reference.phi(activation)(F.linear(x, params[f"{first}.weight"], params.get(f"{first}.bias")))
    if not _same_values(hidden_in, hidden):
        raise NotFusable(f"{name} = {dropout!r} does not act on {activation}({first}(x)) in its "
                         f"forward: {only}")
    if hidden_out is None or not _same_values(out, F.linear(
            hidden_out, params[f"{second}.weight"], params.get(f"{second}.bias"))):
        raise NotFusable(f"its forward does not return {second}({name}(...)) in train mode: {only}")


def fused_block(block: nn.Module, *, weight_decay: float = 0.0, save_hidden: bool = True) -> FusedMLP:
    """The FusedMLP equivalent to ``block`` (sharing its Linear modules under their
    names; an nn.Dropout(p) between the activation and the second Linear becomes
    ``dropout=p``), proven as ``fuse`` proves it; NotFusable (a ValueError) says why not."""
    first, activation, second, dropout = _plan(block)
    _verify(block, first, activation, second, dropout)
    fc1, fc2 = block._modules[first], block._modules[second]
    p = float(block._modules[dropout].p) if dropout is not None else 0.0
    fused = FusedMLP.from_linears(fc1, fc2, activation, weight_decay=weight_decay,
                                  save_hidden=save_hidden, dropout=p, names=(first, second))
    fused.train(block.training)
    return fused


def _is_gated_candidate(block: nn.Module) -> bool:
    # A Sequential chains its children: it cannot multiply two of them.
    return not isinstance(block, nn.Sequential) and len(_linear_children(block)) == 3


def _plan_gated(block: nn.Module) -> Tuple[Tuple[str, str], str, str]:
    """((the two Linears of the hidden layer), activation, down) of a block with
    three Linear children, or NotFusable. Which of the two is the gate is left to
    the probe (_verify_gated): the shapes cannot tell."""
    linears = _linear_children(block)
    activation, _ = _plan_structure(block, linears, hidden_dropout=False)
    for i, (down, layer) in enumerate(linears):
        pair = [(n, l) for j, (n, l) in enumerate(linears) if j != i]
        (na, la), (nb, lb) = pair
        if (la.weight.shape == lb.weight.shape and layer.in_features == la.out_features):
            _check_linear_weights([la, lb, layer], same_bias=False)
            return (na, nb), activation, down
    shapes = ", ".join(f"{n}: {l.in_features}->{l.out_features}" for n, l in linears)
    raise NotFusable(f"its three Linears are not a gated block's (two of one shape feeding the "
                     f"third: {shapes})")


def _verify_gated(block: nn.Module, pair: Tuple[str, str], activation: str,
                  down: str) -> Tuple[str, str]:
    """(gate, up): the order of pair for which the block's own forward matches
    gated_mlp on the random float64 probe (train and eval mode); NotFusable if neither."""
    layer = block._modules[down]
    device = layer.weight.device
    generator = _probe_generator()

    def random(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device)

    d, h, q = block._modules[pair[0]].in_features, layer.in_features, layer.out_features
    try:
        params = {f"{pair[0]}.weight": random(h, d, scale=d ** -0.5),
                  f"{pair[1]}.weight": random(h, d, scale=d ** -0.5),
                  f"{down}.weight": random(q, h, scale=h ** -0.5)}
        for name, size in ((pair[0], h), (pair[1], h), (down, q)):
            if block._modules[name].bias is not None:
                params[f"{name}.bias"] = random(size)
        x = random(2, 3, d, scale=2.0)
    except Exception as e:
        raise NotFusable(f"the float64 probe cannot run on {device} ({type(e).__name__}: {e})") from None
    failures = []
    for gate, up in (pair, pair[::-1]):
        expected, _ = gated_mlp(x, params[f"{gate}.weight"], params[f"{up}.weight"],
                                params[f"{down}.weight"], params.get(f"{gate}.bias"),
                                params.get(f"{up}.bias"), params.get(f"{down}.bias"),
                                activation=activation)
        try:
            _probe(block, params, x, lambda training, expected=expected: expected,
                   f"{down}({activation}({gate}(x)) * {up}(x))")
        except NotFusable as e:
            failures.append(str(e))
        else:
            return gate, up
    raise NotFusable(" and ".join(dict.fromkeys(failures)))


def fused_gated_block(block: nn.Module, *, weight_decay: float = 0.0,
                      save_hidden: bool = True) -> GatedFusedMLP:
    """The GatedFusedMLP equivalent to ``block`` (a LlamaMLP-like module: three
    Linears, down(phi(gate(x)) * up(x))), sharing its Linear modules under their
    names, proven as ``fuse`` proves it; NotFusable (a ValueError) says why not."""
    pair, activation, down = _plan_gated(block)
    gate, up = _verify_gated(block, pair, activation, down)
    fused = GatedFusedMLP.from_linears(
        block._modules[gate], block._modules[up], block._modules[down], activation,
        weight_decay=weight_decay, save_hidden=save_hidden, names=(gate, up, down))
    fused.train(block.training)
    return fused


def _sequential_runs(seq: nn.Sequential) -> bool:
    """Whether a longer Sequential holds a Linear, activation, [Dropout,] Linear run."""
    items = list(seq)
    for i, item in enumerate(items):
        between = 1 + (i + 2 < len(items) and isinstance(items[i + 2], _DROPOUTS))
        if (isinstance(item, nn.Linear) and i + between + 1 < len(items)
                and isinstance(items[i + between + 1], nn.Linear)
                and not any(_has_state(m) for m in items[i + 1:i + between + 1])):
            return True
    return False


def fuse(model: nn.Module, *, weight_decay: float = 0.0, save_hidden: bool = True) -> FuseReport:
    """Replace in place every MLP block of ``model`` proven equivalent to a FusedMLP
    (see this module's docstring for the rule); returns the report of what was
    replaced and what was skipped, and why.

    ``weight_decay`` and ``save_hidden`` are given to every FusedMLP; with
    weight_decay > 0 run the forward inside ``mlp_ext.collect_penalty()`` to get the
    blocks' s. Consumes no random numbers; the Linear modules stay the same objects.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: expected model to be an nn.Module, but got {type(model).__name__}")
    check_module_options("fuse", "identity", weight_decay, save_hidden)
    report = FuseReport()
    done: Dict[int, nn.Module] = {}   # a block shared by several parents is fused once
    seen = set()

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            qualified = prefix + name
            if id(child) in done:
                parent._modules[name] = done[id(child)]
                continue
            if isinstance(child, (FusedMLP, GatedFusedMLP)) or id(child) in seen:
                continue
            seen.add(id(child))
            if _is_gated_candidate(child):
                try:
                    fused = fused_gated_block(child, weight_decay=weight_decay,
                                              save_hidden=save_hidden)
                except NotFusable as e:
                    report.skipped.append(Skipped(qualified, type(child).__name__, str(e)))
                else:
                    parent._modules[name] = fused
                    done[id(child)] = fused
                    report.replaced.append(Replaced(
                        qualified, type(child).__name__, fused.activation, fused._linear_names,
                        (fused.in_features, fused.hidden_features, fused.out_features)))
                    continue
            elif _is_candidate(child):
                try:
                    fused = fused_block(child, weight_decay=weight_decay, save_hidden=save_hidden)
                except NotFusable as e:
                    report.skipped.append(Skipped(qualified, type(child).__name__, str(e)))
                else:
                    parent._modules[name] = fused
                    done[id(child)] = fused
                    report.replaced.append(Replaced(
                        qualified, type(child).__name__, fused.activation, fused._linear_names,
                        (fused.in_features, fused.hidden_features, fused.out_features),
                        fused.dropout))
                    continue
            elif isinstance(child, nn.Sequential) and _sequential_runs(child):
                report.skipped.append(Skipped(
                    qualified, type(child).__name__, "a Linear, activation, Linear run inside a longer "
                    "nn.Sequential: replacing it would renumber the state_dict keys after it"))
            visit(child, qualified + ".")

    if _is_candidate(model) or _is_gated_candidate(model):
        use = "fuse.fused_gated_block" if _is_gated_candidate(model) else "fused_block"
        report.skipped.append(Skipped("", type(model).__name__, "the root module cannot be replaced "
                                      f"in place; use mlp_ext.{use}(model)"))
    visit(model, "")
    return report
