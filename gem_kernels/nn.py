"""The explicit sparse-delta layer: sparse weight gradients as a module the user asks for.

    opt = gem_kernels.SparseAdamW(model.parameters(), lr=1e-3, density=1e-3)
    opt.calibrate(model, batches, loss_fn)        # or the first calibration_steps steps
    gem_kernels.sparsify_(model, opt)             # nn.Linear -> SparseDeltaLinear, visible in print(model)
    ... train ...
    gem_kernels.merge_(model)                     # SparseDeltaLinear -> nn.Linear, the delta added

A ``SparseDeltaLinear`` is an ``nn.Linear`` (so peft, accelerate and ``isinstance`` checks treat it
as one) that holds

* ``weight``: the frozen base (``requires_grad=False``), with the base values at the selected entries;
* ``indices``: a buffer of the selected entries' flat (row-major) indices, strictly ascending;
* ``original``: a buffer of the base values there;
* ``values``: an ``nn.Parameter`` of the k trained values, the only thing an optimizer trains.

It computes with the effective weight ``W = weight`` where at each selected entry ``W[i] =
values[i] + (weight[i] - original[i])``: the trained value while the base is untouched (bit for
bit), and the two changes added when something else changed the base there (peft's
``merge_and_unload`` of a LoRA on top). Forward and backward are ``SparseDeltaLinearFunction``:
the forward builds ``W`` (one layer's copy, dropped after the product) and runs ``F.linear``; the
backward rebuilds it and gives ``dX = dY W`` exactly, the values' gradient from
``gem_kernels::sparse_weight_grad`` (the k entries of ``dYᵀX``, never the dense product) and the
bias's gradient; it forms the dense weight gradient only if the user unfroze the base. Any
optimizer trains ``values``: ``torch.optim.AdamW`` (O(k) state, since the tensor has k entries),
or the SparseAdamW that selected them, which ``sparsify_`` hands them to with their moments.
Under autocast the layer casts what ``F.linear`` would cast (input, base, values, bias) to the
autocast dtype, as autocast does for ``nn.Linear``. On a GPU the values' gradient comes from the
sparse op or from the dense product and a gather, as the committed measurements say
(``weight_grad_dispatch``). ``sparsify_(..., quantize_base="nf4")`` stores the bases in NF4
(``quantize_base_``; docs/ARCHITECTURE.md, "A 4-bit base").
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import library  # noqa: F401  (registers gem_kernels::sparse_weight_grad)
from .ops import check_index_set
from .weight_grad_dispatch import weight_grad_path

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------
# The effective weight and the layer's autograd function


def effective_weight(weight: Tensor, values: Tensor, original: Tensor, indices: Tensor) -> Tensor:
    """The dense weight a ``SparseDeltaLinear`` computes with (a new tensor; see the module doc).
    A 4-bit base is dequantized first (one layer's copy), and its selected entries are the values
    themselves: ``original`` holds the full-precision values there, which the base no longer does."""
    if is_nf4(weight):
        flat = weight.get_original_weight().reshape(-1)
        return flat.index_put_((indices,), values.to(flat.dtype)).view(weight.shape)
    flat = weight.reshape(-1)
    return flat.index_put((indices,), values + (flat[indices] - original)).view_as(weight)


def is_nf4(weight) -> bool:
    """Whether ``weight`` is torchao's ``NF4Tensor`` (found by name: torchao is imported only when a
    user asks for a 4-bit base)."""
    return type(weight).__name__ == "NF4Tensor" and type(weight).__module__.startswith("torchao.")


def quantized_by(weight):
    """The library a weight was quantized by ("torchao", "bitsandbytes"), or None for a plain tensor."""
    module = type(weight).__module__.split(".")[0]
    return module if module in ("torchao", "bitsandbytes") else None


class SparseDeltaLinearFunction(torch.autograd.Function):
    """``F.linear(input, W, bias)`` with ``W`` the base ``weight`` plus the sparse delta (see the
    module doc). Backward: ``dX = dY W`` exactly, the values' gradient through the registered
    operator ``gem_kernels::sparse_weight_grad`` (never the dense ``dW``) or, on a GPU where the
    committed measurements say the matmul library is faster (``weight_grad_dispatch``; unmeasured
    GPUs too), the dense ``dYᵀX`` then a gather, the bias's; the dense ``dW`` of the base only for
    a base the user unfroze. Written with ``setup_context`` and torch ops, so that
    ``torch.func`` (``grad``, ``vjp``, ``jacrev``, ``vmap``) and ``torch.compile(fullgraph=True)``
    take it. Forward mode (``jvp``) is refused by torch: a custom ``jvp`` would make Dynamo break
    the graph, and ``fullgraph`` compilation matters more to training."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, values, original, indices, bias):
        # .to: a 4-bit base dequantizes to the dtype it was quantized from, which autocast may not use.
        return F.linear(input, effective_weight(weight, values, original, indices).to(input.dtype), bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, values, original, indices, bias = inputs
        ctx.save_for_backward(input, weight, values, original, indices)

    @staticmethod
    @once_differentiable  # the operator has no derivative of its own: a double backward raises, never wrong
    def backward(ctx, grad_output):
        input, weight, values, original, indices = ctx.saved_tensors
        dy = grad_output.reshape(-1, weight.shape[0]).contiguous()
        x = input.reshape(-1, weight.shape[1]).contiguous()
        grad_input = grad_weight = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (dy @ effective_weight(weight, values, original, indices).to(dy.dtype)).reshape(input.shape)
        if ctx.needs_input_grad[1]:  # the base was unfrozen: its dense gradient, as nn.Linear's
            grad_weight = dy.t() @ x
        path = weight_grad_path(dy.device, dy.dtype, indices.shape[0] / max(1, weight.numel()))
        if ctx.needs_input_grad[2] and path == "dense":  # where a GPU's matmul library measured faster
            grad_values = (dy.t() @ x).reshape(-1)[indices]
        elif ctx.needs_input_grad[2]:
            offsets = torch.tensor([0, indices.shape[0]], dtype=torch.int64, device=indices.device)
            # Rounded once to dY's dtype, as the dense product dYᵀX of nn.Linear's backward is.
            grad_values = torch.ops.gem_kernels.sparse_weight_grad([x], [dy], indices, offsets).to(dy.dtype)
        if ctx.needs_input_grad[5]:
            grad_bias = dy.sum(0)
        return grad_input, grad_weight, grad_values, None, None, grad_bias


# ---------------------------------------------------------------------------------------
# A 4-bit base

NF4_BLOCK_SIZE = 64          # entries per absmax block, as QLoRA's
NF4_SCALER_BLOCK_SIZE = 256  # absmax values per block of their own 8-bit quantization (double quantization)
NF4_DTYPES = (torch.float32, torch.bfloat16)


def check_nf4_base(where: str, weight) -> None:
    """Raises naming ``where`` unless ``weight`` can be stored as an NF4 base: torchao installed, a
    plain float32 or bfloat16 tensor not quantized already, whose size the blocks divide."""
    quantizer = quantized_by(weight)
    if quantizer is not None:
        raise ValueError(f"{where}: its weight is already quantized by {quantizer} ({type(weight).__name__}); "
                         "quantize_base takes a model in float32 or bfloat16")
    if weight.dtype not in NF4_DTYPES:
        raise ValueError(f"{where}: its weight is {weight.dtype}; an NF4 base is made from float32 or bfloat16")
    whole = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE
    if weight.numel() % whole:
        raise ValueError(f"{where}: its weight has {weight.numel()} entries, not a multiple of {whole} "
                         f"(NF4 blocks of {NF4_BLOCK_SIZE} whose scales are quantized in blocks of "
                         f"{NF4_SCALER_BLOCK_SIZE})")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise ImportError("quantize_base='nf4' needs torchao: pip install 'gem_kernels[quant]'") from None


# ---------------------------------------------------------------------------------------
# The layer


class SparseDeltaLinear(torch.nn.Linear):
    """An ``nn.Linear`` with a frozen base weight and ``values`` trained at ``indices``; see the
    module doc. Make one with ``gem_kernels.sparsify_`` (or ``from_linear``); the constructor
    builds an untrained one with ``nn.Linear``'s initialisation, for loading a state dict into."""

    def __init__(self, in_features: int, out_features: int, indices: Tensor, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        indices = torch.as_tensor(indices, device=self.weight.device)
        self._check_indices(indices)
        selected = self.weight.detach().reshape(-1)[indices]
        self.register_buffer("indices", indices)
        self.register_buffer("original", selected.clone())
        self.values = torch.nn.Parameter(selected.clone())

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, indices: Tensor, original: Tensor) -> "SparseDeltaLinear":
        """The layer over ``linear``'s own weight and bias tensors (shared, not copied): the base is
        ``linear.weight`` with ``original`` written back at ``indices``, and ``values`` the
        weight's current values there, so the layer computes what ``linear`` computed. Freezes the
        base. Checks everything before it changes anything."""
        layer = cls(linear.in_features, linear.out_features, indices.new_zeros(0), bias=False, device="meta")
        weight = linear.weight
        layer._check_indices(indices, weight)
        if original.shape != indices.shape or original.dtype != weight.dtype:
            raise ValueError(f"original must be {weight.dtype} of shape {tuple(indices.shape)}, got "
                             f"{original.dtype} of shape {tuple(original.shape)}")
        with torch.no_grad():
            current = weight.detach().reshape(-1)[indices]
            layer.values = torch.nn.Parameter(current.clone(), requires_grad=weight.requires_grad)
            layer.indices = indices.to(weight.device)
            layer.original = original.to(weight.device).clone()
            weight.detach().view(-1)[indices] = layer.original  # the base: the values before training
        weight.requires_grad_(False)
        layer.weight = weight
        layer.bias = linear.bias
        return layer

    def forward(self, input: Tensor) -> Tensor:
        weight, values, original, bias = self.weight, self.values, self.original, self.bias
        device = input.device.type
        if torch.is_autocast_enabled(device):  # what autocast casts for F.linear (a 4-bit base: after dequantizing)
            dtype = torch.get_autocast_dtype(device)
            input, values, original = (t.to(dtype) for t in (input, values, original))
            weight = weight if is_nf4(weight) else weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return SparseDeltaLinearFunction.apply(input, weight, values, original, self.indices, bias)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The dense weight the layer computes with (a new tensor, the base's dtype: for a 4-bit
        base, the dtype it was quantized from)."""
        return effective_weight(self.weight, self.values.to(self.weight.dtype), self.original, self.indices)

    def quantize_base_(self) -> None:
        """Stores the base in NF4 (torchao's ``NF4Tensor``, blocks of 64 as QLoRA's, scales
        double-quantized in blocks of 256): the trained values and ``original`` stay as they are.
        Raises, changing nothing, where the base cannot be (see ``check_nf4_base``)."""
        check_nf4_base("this SparseDeltaLinear", self.weight)
        from torchao.quantization import NF4Tensor
        nf4 = NF4Tensor.from_tensor(self.weight.detach(), NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
        self.weight = torch.nn.Parameter(nf4, requires_grad=False)

    def extra_repr(self) -> str:
        base = ", base=nf4" if is_nf4(self.weight) else ""
        return f"{super().extra_repr()}, trained_entries={self.indices.numel()}{base}"

    def _check_indices(self, indices: Tensor, weight: Optional[Tensor] = None) -> None:
        weight = self.weight if weight is None else weight
        if indices.dtype != torch.int64 or indices.dim() != 1:
            raise ValueError(f"indices must be a 1-D int64 tensor, got {indices.dtype} of shape "
                             f"{tuple(indices.shape)}")
        if weight.device.type == "meta":
            return
        offsets = torch.tensor([0, indices.numel()], dtype=torch.int64, device=indices.device)
        check_index_set("SparseDeltaLinear", indices, offsets, [weight.numel()], indices.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checks the index set a state dict brings (one the kernels can read) before anything loads.
        (A hook registered on the instance would be pickled with the module, which then no longer
        loads with ``weights_only=True``; overriding this method is how torch's own modules do it.)"""
        indices = state_dict.get(prefix + "indices")
        if isinstance(indices, Tensor):
            self._check_indices(indices)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---------------------------------------------------------------------------------------
# The transforms


def _plain_linear(module) -> bool:
    """An ``nn.Linear`` that computes as ``nn.Linear`` does (a subclass with its own forward does not)."""
    return isinstance(module, torch.nn.Linear) and not isinstance(module, SparseDeltaLinear) \
        and type(module).forward is torch.nn.Linear.forward


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _check_sparsify_args(model, optimizer) -> None:
    from .optim import SparseAdamW

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, SparseAdamW):
        raise TypeError(f"optimizer must be the gem_kernels.SparseAdamW that selected the entries, got "
                        f"{type(optimizer).__name__}")
    if optimizer.incremental:
        raise ValueError("sparsify_ does not take ID3: its unmasking adds entries at every step, so it "
                         "trains on the drop-in path (SparseAdamW alone)")
    if optimizer.phase != "training":
        raise ValueError(f"sparsify_ needs the optimizer's selection; its phase is {optimizer.phase!r} "
                         "(run opt.calibrate(...) or its calibration steps first)")


def _selected_linears(model, entries: dict, quantize_base) -> list:
    """``[(name, module)]`` of the plain ``nn.Linear`` submodules whose weight is a sparse param of
    the optimizer (``entries``); raises for such a weight used by several modules, or for the model
    itself, and with ``quantize_base`` for a module that is no Linear or whose weight cannot be NF4."""
    users = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight in entries:
            users.setdefault(weight, []).append((name, module))
    found = []
    for held_by in users.values():
        names = [name or "<the model itself>" for name, _ in held_by]
        if len(held_by) > 1:
            raise ValueError(f"the weight of {names} is shared by {len(held_by)} modules; sparsify_ "
                             "converts a weight used by one module only")
        name, module = held_by[0]
        if _plain_linear(module) and not name:
            raise ValueError("model itself is the Linear to convert; sparsify_ replaces submodules "
                             "(wrap it, e.g. in nn.Sequential)")
        if _plain_linear(module):
            if quantize_base:
                check_nf4_base(f"module {name!r}", module.weight)
            found.append((name, module))
        elif quantize_base and entries[module.weight][0].numel():
            raise ValueError(f"module {names[0]!r} ({type(module).__name__}) has selected entries but is not an "
                             "nn.Linear: quantize_base stores Linear bases only; leave it out of the optimizer's "
                             "sparse params or do not quantize")
    return found


def sparsify_(model: torch.nn.Module, optimizer, quantize_base=None) -> list:
    """Turns every ``nn.Linear`` of ``model`` whose weight is a sparse param of ``optimizer`` (a
    ``SparseAdamW`` past its selection) into a ``SparseDeltaLinear`` over the same weight and
    bias tensors, and hands the optimizer each layer's ``values`` in place of its weight, with
    the moments and step count it had (``SparseAdamW.replace_trained_params``). Returns the
    converted modules' names. A Linear weight of the optimizer that got no entry becomes a layer of
    0 values: frozen, with no weight gradient computed for it.

    ``quantize_base="nf4"`` stores each converted layer's base in NF4 (``quantize_base_``; torchao,
    ``pip install 'gem_kernels[quant]'``), QLoRA's 4-bit format, after the selection: GEM chose the
    entries by the full-precision weights, and the layers' ``original`` values stay full precision.

    Other sparse params (embeddings, transformers' ``Conv1D``) stay as they are and keep training on
    the drop-in path. Raises, changing nothing, for an optimizer that has not selected, ID3 (its
    unmasking adds entries every step: it stays on the drop-in path), FSDP2 params, a weight shared
    by several modules, no Linear to convert, and with ``quantize_base`` for a selected module that
    is no Linear, a weight neither float32 nor bfloat16 or not a multiple of NF4's blocks, or a model
    quantized already.
    """
    _check_sparsify_args(model, optimizer)
    if quantize_base not in (None, "nf4"):
        raise ValueError(f"quantize_base must be None or 'nf4', got {quantize_base!r}")
    entries = optimizer.selected_entries()
    if any(type(p) not in (Tensor, torch.nn.Parameter) for p in entries):
        raise TypeError("sparsify_ does not take FSDP2 (DTensor) params: their modules compute on "
                        "unsharded copies; train them with SparseAdamW alone")
    layers = {name: (module, *entries[module.weight])
              for name, module in _selected_linears(model, entries, quantize_base)}
    if not layers:
        raise ValueError("no nn.Linear of model has a weight with entries selected by optimizer; "
                         "pass the model the optimizer trains")
    converted = {}
    for name, (module, indices, original) in layers.items():  # every check above: now change
        converted[name] = (module.weight, SparseDeltaLinear.from_linear(module, indices, original))
    optimizer.replace_trained_params({weight: layer.values for weight, layer in converted.values()})
    for name, (_, layer) in converted.items():
        if quantize_base:
            layer.quantize_base_()
        _replace(model, name, layer)
    return list(converted)


@torch.no_grad()
def merge_(model: torch.nn.Module, dtype=None) -> list:
    """Turns every ``SparseDeltaLinear`` of ``model`` back into an ``nn.Linear`` whose weight holds
    the effective weight that requires grad again, as a fresh ``nn.Linear``'s. In the base's dtype
    (for a 4-bit base, the one it was quantized from: the dequantized base plus the delta), or in
    ``dtype``. A full-precision base is written in place (bit for bit the trained values while the
    base was untouched); a 4-bit one is replaced. Returns the merged modules' names. An optimizer
    still holding a layer's ``values`` no longer changes the model. Raises, changing nothing, where
    ``dtype`` would round a trained entry back to its base value (the delta lost)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]
    if any(not name for name, _ in layers):
        raise ValueError("model itself is a SparseDeltaLinear; merge_ replaces submodules (use merged_weight())")
    merged = {name: _merged_in(name, layer, dtype) for name, layer in layers}  # every check first
    for name, layer in layers:
        weight = layer.weight
        if is_nf4(weight) or merged[name].dtype != weight.dtype:
            weight = torch.nn.Parameter(merged[name])
        else:
            weight.copy_(merged[name])
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        linear.weight = weight
        linear.bias = layer.bias
        weight.requires_grad_(True)
        _replace(model, name, linear)
    return [name for name, _ in layers]


def _merged_in(name: str, layer: SparseDeltaLinear, dtype) -> Tensor:
    """The layer's effective weight in ``dtype`` (default: the base's), checked to keep every change
    the values made to their original values (which rounding to ``dtype`` may undo)."""
    merged = layer.merged_weight()
    if dtype is None or dtype == merged.dtype:
        return merged
    trained, before = merged.reshape(-1)[layer.indices], layer.original.to(merged.dtype)
    cast = merged.to(dtype)
    lost = (trained != before) & (trained.to(dtype) == before.to(dtype))
    if bool(lost.any()):
        raise ValueError(f"merge_ into {dtype} would lose the delta of module {name!r}: {int(lost.sum())} trained "
                         f"entries round back to their base value; merge into {merged.dtype}")
    return cast


def trained_entries(model: torch.nn.Module) -> dict:
    """``{weight: (indices, original, trained)}`` of every ``SparseDeltaLinear`` of ``model``:
    the flat indices into the weight, the base values there and the effective values (copies)."""
    out = {}
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SparseDeltaLinear):
                trained = layer.merged_weight().reshape(-1)[layer.indices]
                out[layer.weight] = (layer.indices.clone(), layer.original.clone(), trained)
    return out


def delta_values(model: torch.nn.Module) -> set:
    """The ``values`` tensors of the ``SparseDeltaLinear`` layers of ``model`` (by identity)."""
    return {id(m.values) for m in model.modules() if isinstance(m, SparseDeltaLinear)}
