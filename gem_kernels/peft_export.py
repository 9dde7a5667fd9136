"""Export a sparse fine-tune as a PEFT adapter, loadable with ``peft.PeftModel.from_pretrained``.

``save_delta`` is this package's own format (exact apply/remove, checksums). This module writes
the same entries in the format of one of peft's sparse tuners, so the rest of the PEFT ecosystem
can load them:

    gem_kernels.export_peft_shira(model, optimizer, "adapter/")         # SHiRA (Sparse High Rank Adapters)
    gem_kernels.export_peft_supertuning(model, optimizer, "adapter/")   # Super-Tuning
    loaded = peft.PeftModel.from_pretrained(base_model, "adapter/")

Both share everything but the layout of the adapter: collecting the entries, the checks on the
modules, the values (below) and the writing. What peft (checked against 0.21.2:
``peft/tuners/{shira,supertuning}/{config,layer,model}.py``) expects, and how the export meets it:

* Both wrap an ``nn.Linear`` only, and add the stored values, as deltas (trained − original), to
  the frozen weight in the forward pass and in ``merge``.
* ``target_modules`` is a regular expression, the adapted modules' full names escaped, joined by
  ``|`` and anchored: peft matches a list by name suffix, so a list ``["fc"]`` would also wrap a
  nested ``block.fc``, and a string with ``re.fullmatch``, which matches exactly these modules.
* SHiRA holds ``shira_weight`` (``[n]`` float) and ``shira_indices`` (``[2, n]`` int32: rows, then
  columns of the ``[out, in]`` weight) and adds ``sparse_coo(indices, shira_weight * 1)``. It needs
  ``n = r * (in + out)`` in every module, one ``r`` per adapter: the export takes the least ``r``
  that holds every module's entries and refuses ``r * (in + out) > in * out``, as peft does.
  ``mask_type`` other than ``"random"`` leaves ``mask_fn`` unset, so loading draws no random mask;
  ``inference_mode`` is stored as true, which also keeps peft from warning about the mask type.
* Super-Tuning holds ``supertuning_indices`` (``[n]`` int32 flat indices) and ``supertuning_values``
  (``[n]`` float32) and adds ``W.flatten().scatter_add(0, indices, values.to(W.dtype))``. It builds
  the layer before loading with ``n = int(W.numel() * (1 - sparsity))``, one ``sparsity`` per adapter,
  and the file must match: the export takes the ``sparsity`` that gives the module with the largest
  share of its weight trained exactly its entries (the others get more). The indices are stored
  (``save_precomputed_indices``), so none is recomputed from the base weights at load.
* Where a module holds fewer entries than the adapter's count, it is padded with delta ``-0.0`` at
  the first positions that were not trained (``x + -0.0 == x`` for every ``x``, ``-0.0`` included).
* File keys: ``base_model.model.<module>.<tensor>``; ``modules_to_save`` modules as
  ``base_model.model.<module>.<state-dict key>``.

Exactness. One delta per entry, rounded to the dtype peft adds it in (float32 for SHiRA, whose
weight peft keeps in float32 for bf16/fp16 bases by default; the weight's dtype for Super-Tuning,
which casts its values to it), is not always enough: ``original + delta`` is rounded, and an entry
whose trained value has finer bits than any such sum (one that shrank to well under half its size,
or a bf16/fp16 change too fine for one bf16/fp16 delta) cannot be reached. Such an entry gets a
second entry at the same position holding the remainder (the index appears twice, first delta
before remainder): torch's CPU kernels add the repeats in index order and in float32 (the
``sparse_coo`` add, and ``scatter_add``, which for bf16/fp16 sums the repeats in float32 and rounds
once). Before writing, the export runs that same torch operation on the original values and
refuses (``ValueError``, nothing written) unless every entry comes out bit for bit as trained.
So a model loaded on CPU equals ``apply_delta``'s bit for bit. On CUDA (not measured: no GPU was at
hand), torch adds repeated indices with atomics in no fixed order, so an entry with a remainder may
be off as one delta would leave it: by up to about a unit in the last place of the original value.
``save_delta`` is exact everywhere.

Dense groups (a new classification head) are not sparse: pass ``modules_to_save=[...]`` to store
those modules whole in the adapter, as peft's ``modules_to_save`` does, or ``exclude_dense=True``
to save them apart.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .delta import _bits, load_delta, selected_rows

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names
MASK_TYPE = "gem_kernels"  # any value but "random": peft then draws no mask and reads the file's indices


def _peft_config_class(name: str):
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"exporting a peft adapter needs peft ({error}); install it with "
                          "`pip install peft` or `pip install -e \".[finetune]\"`") from None
    if not hasattr(peft, name):
        raise ImportError(f"peft {getattr(peft, '__version__', '?')} has no peft.{name}; install a peft "
                          "release that has it")
    return getattr(peft, name)


# ---------------------------------------------------------------------------------------
# What was trained: (name, param, flat indices, original values, trained values)


def _from_delta_file(params: dict, path) -> list:
    rows = []
    for name, entry in load_delta(path).items():
        param = params.get(name)
        if param is None:
            raise ValueError(f"delta tensor {name!r} is not a parameter of this model")
        if tuple(param.shape) != entry["shape"] or param.dtype != entry["dtype"]:
            raise ValueError(f"delta tensor {name!r} is {entry['dtype']}{entry['shape']}, the model's "
                             f"parameter {param.dtype}{tuple(param.shape)}")
        rows.append((name, param, entry["indices"], entry["original"], entry["new"]))
    if not rows:
        raise ValueError(f"delta file {path} holds no entries to export")
    return rows


# ---------------------------------------------------------------------------------------
# Which modules: targets and modules_to_save


def _owners(model) -> dict:
    """``{id(param): [(module name, attribute name, module), ...]}``, tied params listed under
    every module that holds them."""
    owners = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module_name, attr, module))
    return owners


def _target_module(owners: dict, name: str, param, method: str) -> str:
    held_by = owners.get(id(param), [])
    if len(held_by) > 1:
        raise ValueError(f"parameter {name!r} is shared by {[f'{m}.{a}' for m, a, _ in held_by]} (tied "
                         f"weights); a {method} adapter on one module would not change the others")
    module_name, attr, module = held_by[0]
    if not isinstance(module, torch.nn.Linear) or attr != "weight" or not module_name:
        what = "the model itself" if not module_name else repr(module_name)
        raise ValueError(f"parameter {name!r} is the {attr!r} of {what} ({type(module).__name__}); "
                         f"peft's {method} adapts only the weight of a torch.nn.Linear submodule (not Conv1D, "
                         "Embedding or biases), so it cannot hold these entries. Train only Linear weights "
                         "sparsely, or use gem_kernels.save_delta, which holds any parameter")
    if param.dtype not in _DTYPES:
        raise ValueError(f"parameter {name!r} is {param.dtype}; the export supports {list(_DTYPES)}")
    return module_name


def _target_pattern(targets: list) -> str:
    """``target_modules`` for exactly these modules. peft matches a list by name suffix (``fc`` would
    also wrap ``block.fc``, and its forward then fails on the missing adapter), a string with
    ``re.fullmatch``; the anchors keep it exact under any other regex match too."""
    return "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"


def _modules_to_save(model, patterns, targets: list, dense: list, exclude_dense: bool, method: str) -> dict:
    """``{module name: module}`` that peft will wrap for ``patterns`` (peft's own rule: a plain
    suffix match, ``name.endswith(pattern)``), after checking they hold every dense param."""
    found = {}
    if patterns is not None:
        if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
            raise TypeError(f"modules_to_save must be a list of module names, got {patterns!r}")
        patterns = list(patterns)
        names = dict(model.named_modules(remove_duplicate=False))
        # At load, each target gains a child "<target>.base_layer" that peft's rule may match too.
        keys = list(names) + [f"{t}.base_layer" for t in targets]
        for pattern in patterns:
            hits = [key for key in keys if key.endswith(pattern)]
            if not hits:
                raise ValueError(f"modules_to_save pattern {pattern!r} matches no module of "
                                 f"{type(model).__name__}")
            for key in hits:
                clash = [t for t in targets if key == t or key.startswith(t + ".") or t.startswith(key + ".")]
                if clash:
                    raise ValueError(f"modules_to_save pattern {pattern!r} matches {key!r} (peft matches by "
                                     f"name suffix), which overlaps the {method} target(s) {clash[:3]}")
                found[key] = names[key]
        nested = [(a, b) for a in found for b in found if b.startswith(a + ".")]
        if nested:
            raise ValueError(f"modules_to_save matches both {nested[0][0]!r} and its submodule "
                             f"{nested[0][1]!r}; name modules that do not contain each other")
    covered = {id(p) for module in found.values() for p in module.parameters()}
    missing = [name for name, p in dense if id(p) not in covered]
    if missing and not exclude_dense:
        heads = sorted({name.rpartition(".")[0] or name for name in missing})
        raise ValueError(f"optimizer trains {len(missing)} parameter(s) densely, which a {method} adapter does "
                         f"not hold: {missing[:5]}; pass modules_to_save={heads[:5]} to store those modules "
                         "whole in the adapter (peft's modules_to_save), or exclude_dense=True and save them "
                         "apart")
    return found


# ---------------------------------------------------------------------------------------
# Values


def _deltas(original: torch.Tensor, trained: torch.Tensor, dtype: torch.dtype):
    """Positions (into the k entries) and values in ``dtype`` that, added in order to ``original``
    as peft adds them, give ``trained``: one delta per entry, and a second one at the same position
    where the first cannot reach the trained value."""
    # float64 holds the difference of two float32/bf16/fp16 values exactly (short of extreme
    # exponent gaps), so this is the correctly rounded delta.
    first = (trained.double() - original.double()).to(dtype)
    # A zero delta is -0.0 (x + -0.0 == x for every x, -0.0 included), but +0.0 where the trained
    # value is +0.0: -0.0 + +0.0 is the one sum that turns a -0.0 into +0.0.
    zero = torch.where(trained == 0, trained.to(dtype), torch.full_like(first, -0.0))
    first = torch.where(first == 0, zero, first)
    # The sum as torch's CPU kernels form it: in float32, rounded to the weight's dtype at the end.
    # Where the trained value has finer bits than original + first can give (an entry that shrank
    # to well under half its size), the remainder after that float32 sum goes in a second entry.
    reached = original.float() + first.float()
    short = _bits(reached.to(original.dtype)) != _bits(trained)
    second = (trained.double() - reached.double()).to(dtype)[short]
    positions = torch.cat([torch.arange(original.numel()), short.nonzero().flatten()])
    return positions, torch.cat([first, second])


def _shira_adds(original: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """What a loaded SHiRA layer computes at these entries: peft's forward and merge run
    ``W.clone() += sparse_coo_tensor(shira_indices, shira_weight * scaling)`` (scaling 1), an
    uncoalesced tensor, which torch's CPU kernel adds entry by entry in index order. The stable
    sort puts each first delta before its remainder, as in the file."""
    order = torch.argsort(positions, stable=True)
    out = original.clone()
    out += torch.sparse_coo_tensor(positions[order].unsqueeze(0), values[order] * 1.0, original.shape,
                                   check_invariants=True)
    return out


def _supertuning_adds(original: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """What a loaded Super-Tuning layer computes at these entries: peft's forward and merge run
    ``W.reshape(-1).scatter_add(0, indices, values.to(W.dtype))``, in the file's order."""
    order = torch.argsort(positions, stable=True)
    return original.scatter_add(0, positions[order], values[order].to(original.dtype))


def _padded(flat: torch.Tensor, values: torch.Tensor, total: int):
    """``flat`` (flat weight indices, repeats for remainders) and ``values`` padded to ``total``
    entries with -0.0 at the first untrained positions, sorted by index, a first delta before its
    remainder (a stable sort of entries listed firsts, then remainders)."""
    pad = total - flat.numel()
    # Among the first `total` positions at most flat.numel() are trained, so `pad` are free.
    candidates = torch.arange(total, dtype=torch.int64)
    free = candidates[~torch.isin(candidates, flat)][:pad]
    order = torch.argsort(torch.cat([flat, free]), stable=True)
    # float32 is the dtype of peft's adapter values, and holds bf16/fp16 values exactly.
    return torch.cat([flat, free])[order], torch.cat([values.float(), torch.full((pad,), -0.0)])[order]


# ---------------------------------------------------------------------------------------
# Export: the part both formats share


def _collect(model, source, out_dir, modules_to_save, exclude_dense, method: str, value_dtype, peft_adds):
    """Checks the arguments and turns ``source`` into ``(model, modules, saved, entries)``:
    ``modules`` lists ``(module name, flat weight indices with repeats, values, out, in)`` whose sum
    ``peft_adds`` reproduces bit for bit, ``saved`` the ``modules_to_save`` modules by name."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: use the names without "_orig_mod."
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a str or os.PathLike, got {type(out_dir).__name__}")
    if not isinstance(exclude_dense, bool):
        raise TypeError(f"exclude_dense must be a bool, got {type(exclude_dense).__name__}")
    params = dict(model.named_parameters())
    if isinstance(source, (str, os.PathLike)):
        rows, dense = _from_delta_file(params, source), []  # a delta file does not list dense params
    elif source is None or hasattr(source, "selected_entries"):
        rows, dense = selected_rows(model, source)  # every selected entry, changed or not: the mask
    else:
        raise TypeError(f"source must be a SparseAdamW, the path of a save_delta file, or None (the model's "
                        f"SparseDeltaLinear layers), got {type(source).__name__}")

    owners = _owners(model)
    modules = []
    entries = 0
    for name, param, indices, original, trained in rows:
        module_name = _target_module(owners, name, param, method)
        positions, values = _deltas(original, trained, value_dtype(param))
        reached = peft_adds(original, positions, values)
        # Equal in value (so a NaN of a diverged run is refused) and in bits (the sign of a zero).
        missed = (reached != trained) | (_bits(reached) != _bits(trained))
        if bool(missed.any()):  # nothing is written
            i = int(missed.nonzero()[0])
            raise ValueError(f"{int(missed.sum())} entries of {name!r} cannot be reproduced as the sum "
                             f"peft's {method} computes (e.g. flat index {int(indices[i])}: original "
                             f"{float(original[i])!r}, trained {float(trained[i])!r}); use "
                             "gem_kernels.save_delta for this model")
        modules.append((module_name, indices[positions], values, *param.shape))
        entries += indices.numel()
    saved = _modules_to_save(model, modules_to_save, [m[0] for m in modules], dense, exclude_dense, method)
    return model, modules, saved, entries


def _config_arguments(model, modules: list, modules_to_save, saved: dict) -> dict:
    """The arguments both peft configs take alike."""
    return {"target_modules": _target_pattern([m[0] for m in modules]), "inference_mode": True,
            "modules_to_save": list(modules_to_save) if saved else None,
            "base_model_name_or_path": getattr(model, "name_or_path", None) or None}


def _write(out_dir, tensors: dict, saved: dict, config) -> int:
    """Writes the adapter (what peft's ``save_pretrained`` writes); returns the weights file's size."""
    with torch.no_grad():
        for module_name, module in saved.items():
            for key, value in module.state_dict().items():
                tensors[f"{_PREFIX}{module_name}.{key}"] = value.detach().cpu().clone().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "adapter_model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})  # the metadata peft's save_pretrained writes
    config.save_pretrained(str(out))
    return weights.stat().st_size


def _summary(modules: list, entries: int, tensors: dict, values_key: str, size: int) -> dict:
    return {"modules": len(modules), "entries": entries,
            "remainders": sum(m[1].numel() for m in modules) - entries,
            "stored": sum(t.numel() for k, t in tensors.items() if k.endswith(values_key)), "bytes": size}


# ---------------------------------------------------------------------------------------
# The two formats


def export_peft_shira(model, source, out_dir, *, modules_to_save=None, exclude_dense: bool = False) -> dict:
    """Writes the sparse fine-tune of ``model`` as a peft SHiRA adapter in ``out_dir``
    (``adapter_config.json`` and ``adapter_model.safetensors``), for
    ``peft.PeftModel.from_pretrained(base_model, out_dir)``.

    ``source`` is the ``SparseAdamW`` that trained ``model`` (its selected entries, with the trained
    values read from ``model``, and those of its ``SparseDeltaLinear`` layers), None (the layers'
    entries alone), or the path of a ``save_delta`` file (its changed entries; then ``model`` only
    supplies module names and types, and the values of ``modules_to_save``).
    ``modules_to_save`` names modules stored whole (for a densely trained head); ``exclude_dense``
    skips the check that every dense param is stored. Load with peft's default
    ``autocast_adapter_dtype=True``: with False, bf16/fp16 models round the deltas to their dtype.

    Returns ``{"modules", "r", "entries" (trained entries), "remainders" (second deltas, see the
    module docstring), "stored" (entries with remainders and padding), "bytes"}``.
    """
    config_class = _peft_config_class("ShiraConfig")
    model, modules, saved, entries = _collect(model, source, out_dir, modules_to_save, exclude_dense,
                                              "SHiRA", lambda param: torch.float32, _shira_adds)
    r = max(math.ceil(flat.numel() / (out_f + in_f)) for _, flat, _, out_f, in_f in modules)
    for module_name, _, _, out_f, in_f in modules:
        if r * (in_f + out_f) > in_f * out_f:
            raise ValueError(f"SHiRA stores r*(in+out) entries in every adapted module, one r per adapter: "
                             f"r={r} gives {r * (in_f + out_f)} for {module_name!r}, which has only "
                             f"{out_f}x{in_f} entries; export fewer or more even modules, or use "
                             "export_peft_supertuning")
    tensors = {}
    for module_name, flat, values, out_f, in_f in modules:
        flat, values = _padded(flat, values, r * (in_f + out_f))
        tensors[f"{_PREFIX}{module_name}.shira_weight"] = values.contiguous()
        tensors[f"{_PREFIX}{module_name}.shira_indices"] = (
            torch.stack([flat // in_f, flat % in_f]).to(torch.int32).contiguous())
    config = config_class(r=r, mask_type=MASK_TYPE, **_config_arguments(model, modules, modules_to_save, saved))
    size = _write(out_dir, tensors, saved, config)
    return {"r": r, **_summary(modules, entries, tensors, ".shira_weight", size)}


def _sparsity(modules: list) -> float:
    """The ``sparsity`` at which peft's count, ``int(numel * (1 - sparsity))`` in Python floats, is
    exactly the entries of the module with the largest share of its weight, and holds every other's."""
    needs = [(flat.numel(), out_f * in_f) for _, flat, _, out_f, in_f in modules]
    sparsity = 1.0 - max(n / numel for n, numel in needs)
    # 1 - (1 - d) need not give d back in floats, and int() rounds down: step down until all fit.
    while sparsity > 0.0 and any(int(numel * (1 - sparsity)) < n for n, numel in needs):
        sparsity = math.nextafter(sparsity, -math.inf)
    return max(sparsity, 0.0)


def export_peft_supertuning(model, source, out_dir, *, modules_to_save=None, exclude_dense: bool = False) -> dict:
    """Writes the sparse fine-tune of ``model`` as a peft Super-Tuning adapter in ``out_dir``
    (``adapter_config.json`` and ``adapter_model.safetensors``), for
    ``peft.PeftModel.from_pretrained(base_model, out_dir)``. Arguments as for ``export_peft_shira``.

    Super-Tuning stores the entries themselves (flat indices and values), with no shape constraint;
    peft's one ``sparsity`` per adapter pads the modules holding a smaller share of their weight.

    Returns ``{"modules", "sparsity", "entries" (trained entries), "remainders" (second deltas, see
    the module docstring), "stored" (entries with remainders and padding), "bytes"}``.
    """
    config_class = _peft_config_class("SupertuningConfig")
    model, modules, saved, entries = _collect(model, source, out_dir, modules_to_save, exclude_dense,
                                              "Super-Tuning", lambda param: param.dtype, _supertuning_adds)
    for module_name, flat, _, out_f, in_f in modules:
        # peft's flat indices are int32, and its count int(numel * (1 - sparsity)) is at most numel,
        # which remainders (repeated indices) could exceed in a module trained almost whole.
        if out_f * in_f > torch.iinfo(torch.int32).max + 1 or flat.numel() > out_f * in_f:
            raise ValueError(f"Super-Tuning cannot hold {module_name!r} ({out_f}x{in_f}) with its {flat.numel()} "
                             "entries (remainders included): it stores at most one entry per weight entry, "
                             "addressed by int32 flat indices; use gem_kernels.save_delta")
    sparsity = _sparsity(modules)
    tensors = {}
    for module_name, flat, values, out_f, in_f in modules:
        flat, values = _padded(flat, values, int(out_f * in_f * (1 - sparsity)))
        tensors[f"{_PREFIX}{module_name}.supertuning_values"] = values.contiguous()
        tensors[f"{_PREFIX}{module_name}.supertuning_indices"] = flat.to(torch.int32).contiguous()
    config = config_class(sparsity=sparsity, **_config_arguments(model, modules, modules_to_save, saved))
    size = _write(out_dir, tensors, saved, config)
    return {"sparsity": sparsity, **_summary(modules, entries, tensors, ".supertuning_values", size)}
