"""Sparse weight gradients: once the entries are selected, an ``nn.Linear`` (or transformers'
``Conv1D``) whose weight is a trained sparse param computes only the selected entries of its
weight gradient, with the ``sparse_weight_grad`` op, instead of the dense ``dW = dYᵀX``.

Where it pays (the policy, ``sparse_weight_grads="auto"``, the default): on CPU, where the C++
op takes 17-23 % off a step (benchmarks/results/step_cost.md). Not on CUDA: there the dense
``dYᵀX`` through the matmul library, then the gather, measured faster on every shape timed (an
H200: three 2048x5632 bf16 layers at T=4096, density 1e-3: 1.21 ms against 2.03 ms for the
Triton op), so CUDA weights keep the dense path. ``True`` and ``False`` force it on or off.

How a module is routed. Its class is swapped for a subclass of its own class (same name, same
state) whose ``forward`` looks its weight up among the *routes*, a table keyed by the weight
tensor itself: a weight with a route goes through ``_SparseWeightGradLinear``, any other weight
through the original ``forward``. So:

* a copy (``copy.deepcopy``, ``torch.save``/``torch.load``) is of the original class (see
  ``__reduce_ex__``): it holds its own weights, which no route names, and loads without us;
* a weight reassigned after the selection has no route (the dense path, as for any optimizer);
  a weight resized in place raises, naming the module, before any index is read;
* a ``forward`` set on the instance (accelerate's hooks) is never touched: it wins over the
  class's, and undoing the swap leaves it in place;
* keyword calls (``lin(input=x)``) keep the original signature.

Why not one autograd leaf: the weight gradient's k values go to a small *proxy* leaf (one value
per selected entry) whose post-accumulate-grad hook moves them into ``weight.grad`` as the same
coalesced sparse COO tensor the optimizer's gradient hook makes. A sparse gradient cannot come
out of a graph that ``torch.compile`` traces, and a dense one is what we avoid. When a backward
does not reach the proxy (``torch.autograd.grad(loss, [weight])``, ``loss.backward(inputs=[...])``)
the weight gets its dense gradient instead, as the dense path gives it.

Under ``torch.compile`` the routed forward is the original one: the compiled graph cannot ask
the autograd engine where a backward goes, so it keeps the dense path, which is right for
every backward (the optimizer's gradient hook then keeps the selected entries).

Which modules: the optimizer sees params, not modules. ``SparseAdamW.register_modules(model)``
names them; otherwise, until the end of its first training step, a global forward hook (the
*watch*) records the modules whose weight it trains. Classes are swapped when training starts
(the modules registered or seen so far) or, for a module first seen after that, at the end of
the first training step: never between a forward and its backward, which may recompute a
checkpointed region and must run the same code again. So where the selection comes before any
forward (Random at construction, a checkpoint loaded into a fresh optimizer) the first training
step takes the dense path unless the model was registered: the same result to fp32 rounding,
not bit for bit. The watch also notices a ``DistributedDataParallel`` wrapper of our params,
which cannot take the sparse COO gradients unless ``gem_kernels.distributed.attach`` was called.
"""
from __future__ import annotations

import copyreg
import functools
import weakref

import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_hook
from torch.utils.weak import WeakIdKeyDictionary

from .. import library  # noqa: F401  (registers torch.ops.gem_kernels)

Tensor = torch.Tensor

POLICIES = ("auto", True, False)
PLAIN_DDP_MESSAGE = ("the model is wrapped in DistributedDataParallel but gem_kernels.distributed.attach("
                     "ddp_model, optimizer) was not called: after the selection the sparse params' gradients "
                     "are sparse COO tensors, which DDP cannot reduce; call attach before training")

# weight -> _Route of the optimizer that trains it (one owner per param, see grads.claim).
# Weak: a collected weight frees its route.
_ROUTES = WeakIdKeyDictionary()


def sparse_weight_grad_pays(device: torch.device, policy="auto") -> bool:
    """Whether a weight on ``device`` gets sparse weight gradients under ``policy``."""
    if policy == "auto":
        return torch.device(device).type == "cpu"  # measured: see the module doc
    return bool(policy)


def _engine_will_run(node) -> bool:
    """Whether the running backward executes ``node``. torch has no public API for this; the
    private call is what torch.utils.checkpoint uses to stop a recomputation early."""
    return torch._C._will_engine_execute_node(node)


class _SparseWeightGradLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` (``x W + b`` for Conv1D) whose weight gradient goes to ``gate`` (a view
    of the proxy): the values at ``indices`` only, or the dense gradient to ``weight`` when the
    backward does not reach the proxy."""

    @staticmethod
    def forward(x, weight, bias, gate, indices, offsets, conv1d: bool):
        if conv1d:
            y = x.reshape(-1, x.shape[-1]) @ weight
            y = y if bias is None else y + bias
            return y.reshape(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, gate, indices, offsets, conv1d = inputs
        ctx.save_for_backward(x, weight, indices, offsets)
        ctx.conv1d = conv1d
        ctx.gate_node = gate.grad_fn
        ctx.proxy_dtype = gate.dtype

    @staticmethod
    def backward(ctx, dy):
        x, weight, indices, offsets = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        # Under autocast the forward ran in dy's dtype: read x as autocast cast it.
        x2 = x.reshape(-1, x.shape[-1]).to(dy2.dtype).contiguous()
        w = weight.to(dy2.dtype)
        dx = (dy2 @ w.t() if ctx.conv1d else dy2 @ w).reshape(x.shape).to(x.dtype) \
            if ctx.needs_input_grad[0] else None
        db = dy2.sum(0) if ctx.needs_input_grad[2] else None
        if not _engine_will_run(ctx.gate_node):  # autograd.grad / backward(inputs=) of the weight
            dw = (x2.t() @ dy2 if ctx.conv1d else dy2.t() @ x2).to(weight.dtype) \
                if ctx.needs_input_grad[1] else None
            return dx, dw, db, None, None, None, None
        pair = ([dy2], [x2]) if ctx.conv1d else ([x2], [dy2])  # Conv1D's weight is [in, out]
        # The operator itself: its inputs are ours (the index set checked when selected, the
        # weight's shape at the forward), and the Python checks of ops.sparse_weight_grad would
        # only add guards to the backward.
        values = torch.ops.gem_kernels.sparse_weight_grad(*pair, indices, offsets)
        # Rounded once to dY's dtype, as the dense product dYᵀX (a bf16 GEMM under autocast) is.
        return dx, None, db, values.to(dy2.dtype).to(ctx.proxy_dtype), None, None, None


class _Route:
    """One trained weight: its index set, COO coordinates and proxy leaf."""

    def __init__(self, weight: Tensor, indices: Tensor, coords: Tensor, owner):
        self.weight_ref = weakref.ref(weight)
        self.shape = weight.shape
        self.indices = indices
        self.offsets = torch.tensor([0, indices.numel()], dtype=torch.int64, device=indices.device)
        self.coords = coords
        self.owner_ref = weakref.ref(owner)  # the SparseWeightGrads that made it (weak: no cycle)
        self.proxy = torch.zeros(indices.numel(), dtype=weight.dtype, device=weight.device, requires_grad=True)
        self.proxy.register_post_accumulate_grad_hook(self._move_to_weight)

    @torch.compiler.disable
    def _move_to_weight(self, proxy: Tensor) -> None:
        values, proxy.grad = proxy.grad, None
        weight = self.weight_ref()
        if weight is None:
            return
        grad = weight.grad
        if grad is not None and grad.is_sparse and grad._indices().data_ptr() == self.coords.data_ptr():
            grad._values().add_(values)  # accumulation over several backward calls
            return
        selected = torch.sparse_coo_tensor(self.coords, values, weight.shape, is_coalesced=True,
                                           check_invariants=False)
        weight.grad = selected if grad is None else grad + selected


def _routed_forward(module, x):
    base_forward = _original_class(type(module)).forward
    if torch.compiler.is_compiling():
        return base_forward(module, x)
    weight = module.weight
    route = _ROUTES.get(weight) if isinstance(weight, Tensor) else None
    if route is None:
        return base_forward(module, x)
    if weight.shape != route.shape:
        owner = route.owner_ref()
        raise ValueError(f"{owner.describe(module) if owner else type(module).__name__}: its weight has shape "
                         f"{tuple(weight.shape)} but had {tuple(route.shape)} when its entries were chosen; "
                         "resizing a trained weight is "
                         "not supported (close the optimizer and make a new one)")
    gate = route.proxy.view_as(route.proxy)  # a node that tells whether this backward reaches the proxy
    return _SparseWeightGradLinear.apply(x, weight, module.bias, gate, route.indices, route.offsets,
                                         _is_conv1d(module))


class _RoutedLinear:
    """Mixed in before a ``Linear`` class: its ``forward``, routed."""

    def forward(self, input):  # torch's parameter name, so that lin(input=x) still works
        return _routed_forward(self, input)

    def __reduce_ex__(self, protocol):
        return _as_original(self, super().__reduce_ex__(protocol))


class _RoutedConv1D:
    """Mixed in before transformers' ``Conv1D``: its ``forward``, routed."""

    def forward(self, x):  # Conv1D's parameter name
        return _routed_forward(self, x)

    def __reduce_ex__(self, protocol):
        return _as_original(self, super().__reduce_ex__(protocol))


def _as_original(module, reduced):
    """Copies and pickles of a routed module are of its original class: a copy holds its own
    weights, which no optimizer trains sparsely, and must load where gem_kernels is absent.
    copyreg's own constructor, as pickle's protocols 0 and 1 use it (``__newobj__`` must get the
    object's real class), so that loading needs nothing of ours."""
    constructor, args, *rest = reduced
    return (copyreg._reconstructor, (_original_class(type(module)), object, None), *rest)


def _original_class(cls) -> type:
    return cls.__dict__.get("_routed_from", cls)


@functools.lru_cache(maxsize=None)
def _routed_class(cls) -> type:
    """The subclass of ``cls`` with the routed forward; same name, so that repr() is unchanged."""
    mixin = _RoutedConv1D if _is_conv1d_class(cls) else _RoutedLinear
    return type(cls.__name__, (mixin, cls), {"_routed_from": cls, "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__})


def _is_conv1d_class(cls) -> bool:
    # Found by name and method, so that transformers is never imported for this.
    return any(base.__name__ == "Conv1D" and base.__module__ == "transformers.pytorch_utils"
               for base in cls.__mro__)


def _is_conv1d(module) -> bool:
    return _is_conv1d_class(type(module))


def _routable(module) -> bool:
    cls = _original_class(type(module))
    if isinstance(module, torch.nn.Linear):
        return cls.forward is torch.nn.Linear.forward  # a subclass with its own forward computes otherwise
    return _is_conv1d_class(cls)


@torch.compiler.disable
def _on_call(owner_ref, module, args, output) -> None:
    """The watch (a global forward hook): records our modules. Never swaps: between a forward
    and its backward a checkpointed region is recomputed, and must run the same code again."""
    owner = owner_ref()
    if owner is not None:
        owner.saw(module)


class SparseWeightGrads:
    """The routed modules of one optimizer and the watch that finds them. Undone by
    ``remove()`` or when this object (owned by the optimizer) is collected."""

    def __init__(self, policy="auto"):
        if policy not in POLICIES or not isinstance(policy, (bool, str)):
            raise ValueError(f"sparse_weight_grads must be 'auto', True or False, got {policy!r}")
        self.policy = policy
        self.seen = weakref.WeakValueDictionary()  # id(module) -> module whose weight we train
        self.names = weakref.WeakKeyDictionary()  # module -> its name in a registered model
        self.routed = weakref.WeakValueDictionary()  # id(module) -> module whose class we swapped
        self.plain_ddp = None  # a DistributedDataParallel module seen wrapping our params
        self.active = False
        self._weights = {}  # id(weight) -> weakref(weight): the params we train
        self._handles = []  # the watch: one global forward hook while it is on
        self._routes = {}   # id(weight) -> _Route made by this object
        weakref.finalize(self, SparseWeightGrads._undo, self._handles, self.routed, self._routes)

    @staticmethod
    def _undo(handles, routed, routes) -> None:
        for handle in handles:
            handle.remove()
        handles.clear()
        for route in routes.values():
            weight = route.weight_ref()
            if weight is not None and _ROUTES.get(weight) is route:
                del _ROUTES[weight]
        routes.clear()
        for module in list(routed.values()):
            weight = getattr(module, "weight", None)
            if not (isinstance(weight, Tensor) and weight in _ROUTES):  # another optimizer's route stays
                module.__class__ = _original_class(type(module))
        routed.clear()

    def describe(self, module) -> str:
        name = self.names.get(module)
        return f"{type(module).__name__} {name!r}" if name else f"a {type(module).__name__} module"

    def watch(self, weights) -> None:
        """Note calls of modules whose weight is one of ``weights``, until ``stop_watching``."""
        self._weights = {id(w): weakref.ref(w) for w in weights}
        if not self._handles:  # weak: the global hook must not keep this object (and itself) alive
            self._handles.append(register_module_forward_hook(functools.partial(_on_call, weakref.ref(self))))

    def stop_watching(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def saw(self, module) -> None:
        """A module was called while watching."""
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            if any(id(p) in self._weights for p in module.module.parameters()):
                self.plain_ddp = weakref.ref(module)
                if self.active:  # training: this forward's backward would fail inside DDP
                    raise RuntimeError(PLAIN_DDP_MESSAGE)
        else:
            self.register([(None, module)], route=False)

    def register(self, named_modules, route: bool = True) -> None:
        """Records the routable modules of ``named_modules`` ((name or None, module) pairs) whose
        weight we train; swaps their classes in training when ``route``."""
        for name, module in named_modules:
            weight = getattr(module, "weight", None)
            ref = self._weights.get(id(weight)) if isinstance(weight, Tensor) else None
            if ref is None or ref() is not weight or not _routable(module):
                continue
            self.seen[id(module)] = module
            if name:
                self.names[module] = name
            if route and self.active:
                self._swap(module)

    def finish_watching(self) -> None:
        """After the first training step (its backward is done): route what the watch saw."""
        self.stop_watching()
        if self.active:
            for module in list(self.seen.values()):
                self._swap(module)

    def install(self, weights_and_indices, coords: dict) -> None:
        """Training starts: make the routes of the weights the policy gives sparse weight
        gradients, and swap the class of every module seen so far."""
        self.remove_routes()
        for w, indices in weights_and_indices:
            if w.requires_grad and indices.numel() and w in coords and sparse_weight_grad_pays(w.device, self.policy):
                route = _Route(w, indices, coords[w], self)
                self._routes[id(w)] = route
                _ROUTES[w] = route
        self.active = True
        for module in list(self.seen.values()):
            self._swap(module)

    def _swap(self, module) -> None:
        if id(module) in self.routed or id(module.weight) not in self._routes:
            return
        module.__class__ = _routed_class(_original_class(type(module)))
        self.routed[id(module)] = module

    def remove_routes(self) -> None:
        self._undo([], self.routed, self._routes)
        self.active = False

    def remove(self) -> None:
        self.remove_routes()
        self.stop_watching()
        self.seen.clear()
