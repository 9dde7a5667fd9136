"""Export a sparse fine-tune as a PEFT SHiRA adapter, loadable with ``peft.PeftModel.from_pretrained``.

``save_delta`` is this package's own format (exact apply/remove, checksums). This module writes
the same entries in the format of peft's SHiRA tuner (Sparse High Rank Adapters), so the rest of
the PEFT ecosystem can load them:

    gem_kernels.export_peft_shira(model, optimizer, "adapter/")
    loaded = peft.PeftModel.from_pretrained(base_model, "adapter/")

What peft (checked against 0.21.2: ``peft/tuners/shira/{config,layer,model}.py``) expects, and
how this export meets it:

* A SHiRA layer wraps an ``nn.Linear`` only, and holds ``shira_weight`` (``[k]``, float) and
  ``shira_indices`` (``[2, k]`` int32: rows, then columns of the ``[out, in]`` weight). Its
  forward and ``merge`` compute ``W + sparse_coo(indices, shira_weight * scaling)`` with
  ``scaling = 1``: the values are deltas (trained − original), added to the base weight.
* ``k = r * (in + out)`` in every adapted module, with one ``r`` per adapter. The export takes
  ``r = max over modules of ceil(k_m / (in + out))`` (``k_m`` counting remainders, below) and
  pads each module to ``r * (in + out)`` entries with delta ``-0.0`` at the first positions that
  were not trained (``x + -0.0 == x`` for every ``x``, ``-0.0`` included, so padding changes
  nothing). peft refuses ``r * (in + out) > in * out``; so does the export, before writing.
* ``mask_type`` other than ``"random"`` leaves ``mask_fn`` unset, so loading draws no random
  mask; the indices then come from the file. ``inference_mode`` is stored as true, which is
  also what keeps peft from warning about the unknown mask type.
* ``target_modules`` lists the adapted modules by their full names, so no other module matches.
* File keys: ``base_model.model.<module>.shira_weight`` and ``base_model.model.<module>.shira_indices``;
  ``modules_to_save`` modules as ``base_model.model.<module>.<state-dict key>``.

Exactness. peft keeps ``shira_weight`` in float32 for bf16/fp16 bases (its default
``autocast_adapter_dtype=True``) and in the weight's dtype for fp32 bases, so the deltas are
stored in float32. For bf16/fp16 models one float32 delta per entry is exact (the difference of
two such values fits a float32). For fp32 models ``original + delta`` is rounded to float32, and
an entry whose trained value has finer bits than any such sum (one that shrank to well under
half its size: a few percent of the entries of an ordinary run) cannot be reached by one delta.
Such an entry gets a second entry at the same position holding the remainder (the index appears
twice in ``shira_indices``): torch sums the repeats of an uncoalesced sparse tensor, and its CPU
kernel adds them one by one in index order, which the file's order makes first delta, then
remainder. Before writing, the export runs that same addition for every entry and refuses
(``ValueError``, nothing written) if any entry misses its trained value. On CUDA, torch adds
repeated indices with atomics in no fixed order, so at those few entries a model loaded on a
GPU may be off as one delta would leave it: by up to about a unit in the last place of the
original value. ``save_delta`` is exact everywhere.

Dense groups (a new classification head) are not sparse: pass ``modules_to_save=[...]`` to store
those modules whole in the adapter, as peft's ``modules_to_save`` does, or ``exclude_dense=True``
to save them apart.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .delta import load_delta

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names
MASK_TYPE = "gem_kernels"  # any value but "random": peft then draws no mask and reads the file's indices


def _import_peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"export_peft_shira needs peft ({error}); install it with "
                          "`pip install peft` or `pip install -e \".[finetune]\"`") from None
    if not hasattr(peft, "ShiraConfig"):
        raise ImportError(f"peft {getattr(peft, '__version__', '?')} has no SHiRA tuner "
                          "(peft.ShiraConfig); install a peft release that has it")
    return peft


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


def _from_optimizer(params: dict, optimizer):
    """Every selected entry (changed or not: the mask is the selection, which matters to anyone
    who trains the adapter further) and the params the optimizer trains densely."""
    selected = optimizer.selected_entries()
    name_of = {id(p): name for name, p in params.items()}
    unknown = [tuple(p.shape) for p in selected if id(p) not in name_of]
    if unknown:
        raise ValueError(f"optimizer holds {len(unknown)} selected parameter(s) that model does not "
                         f"contain (shapes {unknown[:3]}); pass the model the optimizer trains")
    rows = []
    with torch.no_grad():
        for param, (indices, original) in selected.items():
            if indices.numel() == 0:
                continue
            trained = param.detach().reshape(-1)[indices.to(param.device)]
            rows.append((name_of[id(param)], param, indices.to("cpu", torch.int64), original.detach().cpu(),
                         trained.cpu()))
    if not rows:
        raise ValueError(f"optimizer has selected no entries yet (phase "
                         f"{getattr(optimizer, 'phase', '?')!r}); train past selection before exporting")
    selected_ids = {id(p) for p in selected}
    dense = [(name_of.get(id(p), f"<shape {tuple(p.shape)}>"), p)
             for group in optimizer.param_groups for p in group["params"]
             if p.requires_grad and id(p) not in selected_ids]
    return rows, dense


# ---------------------------------------------------------------------------------------
# Which modules: SHiRA targets and modules_to_save


def _owners(model) -> dict:
    """``{id(param): [(module name, attribute name, module), ...]}``, tied params listed under
    every module that holds them."""
    owners = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module_name, attr, module))
    return owners


def _target_module(owners: dict, name: str, param) -> str:
    held_by = owners.get(id(param), [])
    if len(held_by) > 1:
        raise ValueError(f"parameter {name!r} is shared by {[f'{m}.{a}' for m, a, _ in held_by]} (tied "
                         "weights); a SHiRA adapter on one module would not change the others")
    module_name, attr, module = held_by[0]
    if not isinstance(module, torch.nn.Linear) or attr != "weight" or not module_name:
        what = "the model itself" if not module_name else repr(module_name)
        raise ValueError(f"parameter {name!r} is the {attr!r} of {what} ({type(module).__name__}); "
                         "peft's SHiRA adapts only the weight of a torch.nn.Linear submodule (not Conv1D, "
                         "Embedding or biases), so it cannot hold these entries. Train only Linear weights "
                         "sparsely, or use gem_kernels.save_delta, which holds any parameter")
    if param.dtype not in _DTYPES:
        raise ValueError(f"parameter {name!r} is {param.dtype}; the export supports {list(_DTYPES)}")
    return module_name


def _modules_to_save(model, patterns, targets: list, dense: list, exclude_dense: bool) -> dict:
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
                                     f"name suffix), which overlaps the SHiRA target(s) {clash[:3]}")
                found[key] = names[key]
        nested = [(a, b) for a in found for b in found if b.startswith(a + ".")]
        if nested:
            raise ValueError(f"modules_to_save matches both {nested[0][0]!r} and its submodule "
                             f"{nested[0][1]!r}; name modules that do not contain each other")
    covered = {id(p) for module in found.values() for p in module.parameters()}
    missing = [name for name, p in dense if id(p) not in covered]
    if missing and not exclude_dense:
        heads = sorted({name.rpartition(".")[0] or name for name in missing})
        raise ValueError(f"optimizer trains {len(missing)} parameter(s) densely, which a SHiRA adapter does "
                         f"not hold: {missing[:5]}; pass modules_to_save={heads[:5]} to store those modules "
                         "whole in the adapter (peft's modules_to_save), or exclude_dense=True and save them "
                         "apart")
    return found


# ---------------------------------------------------------------------------------------
# Values


def _deltas(original: torch.Tensor, trained: torch.Tensor):
    """Positions (into the k entries) and float32 values that, added in order to ``original`` as
    peft adds them, give ``trained``: one delta per entry, and a second one at the same position
    where the first cannot reach the trained value."""
    # float64 holds the difference of two float32/bf16/fp16 values exactly (short of extreme
    # exponent gaps), so this is the correctly rounded float32 delta.
    first = (trained.double() - original.double()).float()
    # -0.0, not +0.0, where nothing changed: x + (-0.0) == x for every x, -0.0 included.
    first = torch.where(first == 0, torch.full_like(first, -0.0), first)
    # peft adds in float32 (its SHiRA weight's dtype, and the common dtype with bf16/fp16 weights).
    # For fp32 weights a + first is rounded once more, and where the trained value has finer bits
    # than that sum can give (an entry that shrank to well under half its size), the remainder
    # goes in a second entry: reached is within a unit or so of trained, so it is exact.
    reached = original.float() + first
    short = reached.to(original.dtype) != trained
    positions = torch.cat([torch.arange(original.numel()), short.nonzero().flatten()])
    return positions, torch.cat([first, (trained.float() - reached)[short]])


def _as_peft_adds(original: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """What a loaded SHiRA layer computes at these entries: peft's forward and merge run
    ``W.clone() += sparse_coo_tensor(shira_indices, shira_weight * scaling)`` (scaling 1), an
    uncoalesced tensor, which torch's CPU kernel adds entry by entry in index order. The stable
    sort puts each first delta before its remainder, as in the file."""
    order = torch.argsort(positions, stable=True)
    out = original.clone()
    out += torch.sparse_coo_tensor(positions[order].unsqueeze(0), values[order] * 1.0, original.shape,
                                   check_invariants=True)
    return out


def _module_tensors(flat, values, out_features: int, in_features: int, r: int):
    """``shira_indices`` [2, r*(in+out)] int32 and ``shira_weight`` [r*(in+out)] float32, padded
    with -0.0 at the first untrained positions and sorted row-major, a first delta before its
    remainder (a stable sort of entries listed firsts, then remainders)."""
    total = r * (in_features + out_features)
    pad = total - flat.numel()
    # Among the first `total` positions at most flat.numel() are trained, so `pad` are free.
    candidates = torch.arange(total, dtype=torch.int64)
    free = candidates[~torch.isin(candidates, flat)][:pad]
    order = torch.argsort(torch.cat([flat, free]), stable=True)
    flat = torch.cat([flat, free])[order]
    values = torch.cat([values, torch.full((pad,), -0.0)])[order]
    rows_cols = torch.stack([flat // in_features, flat % in_features]).to(torch.int32)
    return rows_cols.contiguous(), values.contiguous()


# ---------------------------------------------------------------------------------------
# Export


def export_peft_shira(model, source, out_dir, *, modules_to_save=None, exclude_dense: bool = False) -> dict:
    """Writes the sparse fine-tune of ``model`` as a peft SHiRA adapter in ``out_dir``
    (``adapter_config.json`` and ``adapter_model.safetensors``), for
    ``peft.PeftModel.from_pretrained(base_model, out_dir)``.

    ``source`` is the ``SparseAdamW`` that trained ``model`` (its selected entries, with the trained
    values read from ``model``) or the path of a ``save_delta`` file (its changed entries; then
    ``model`` only supplies module names and types, and the values of ``modules_to_save``).
    ``modules_to_save`` names modules stored whole (for a densely trained head); ``exclude_dense``
    skips the check that every dense param is stored. Load with peft's default
    ``autocast_adapter_dtype=True``: with False, bf16/fp16 models round the deltas to their dtype.

    Returns ``{"modules", "r", "entries" (trained entries), "remainders" (second deltas, see the
    module docstring), "stored" (entries with remainders and padding), "bytes"}``.
    """
    peft = _import_peft()
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
    elif hasattr(source, "selected_entries"):
        rows, dense = _from_optimizer(params, source)
    else:
        raise TypeError(f"source must be a SparseAdamW or the path of a save_delta file, got "
                        f"{type(source).__name__}")

    owners = _owners(model)
    modules = []  # (module name, flat weight indices with repeats, values, out, in)
    entries = 0
    for name, param, indices, original, trained in rows:
        module_name = _target_module(owners, name, param)
        positions, values = _deltas(original, trained)
        missed = _as_peft_adds(original, positions, values) != trained
        if bool(missed.any()):  # e.g. a NaN; nothing is written
            i = int(missed.nonzero()[0])
            raise ValueError(f"{int(missed.sum())} entries of {name!r} cannot be reproduced as the sum "
                             f"peft's SHiRA computes (e.g. flat index {int(indices[i])}: original "
                             f"{float(original[i])!r}, trained {float(trained[i])!r}); use "
                             "gem_kernels.save_delta for this model")
        modules.append((module_name, indices[positions], values, *param.shape))
        entries += indices.numel()
    targets = [m[0] for m in modules]
    saved = _modules_to_save(model, modules_to_save, targets, dense, exclude_dense)

    r = max(math.ceil(flat.numel() / (out_f + in_f)) for _, flat, _, out_f, in_f in modules)
    for module_name, _, _, out_f, in_f in modules:
        if r * (in_f + out_f) > in_f * out_f:
            raise ValueError(f"SHiRA stores r*(in+out) entries in every adapted module, one r per adapter: "
                             f"r={r} gives {r * (in_f + out_f)} for {module_name!r}, which has only "
                             f"{out_f}x{in_f} entries; export fewer or more even modules")
    tensors = {}
    for module_name, flat, values, out_f, in_f in modules:
        shira_indices, shira_weight = _module_tensors(flat, values, out_f, in_f, r)
        tensors[f"{_PREFIX}{module_name}.shira_weight"] = shira_weight
        tensors[f"{_PREFIX}{module_name}.shira_indices"] = shira_indices

    with torch.no_grad():
        for module_name, module in saved.items():
            for key, value in module.state_dict().items():
                tensors[f"{_PREFIX}{module_name}.{key}"] = value.detach().cpu().clone().contiguous()

    config = peft.ShiraConfig(
        r=r, mask_type=MASK_TYPE, target_modules=targets, inference_mode=True,
        modules_to_save=list(modules_to_save) if saved else None,
        base_model_name_or_path=getattr(model, "name_or_path", None) or None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "adapter_model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})  # the metadata peft's save_pretrained writes
    config.save_pretrained(str(out))
    return {"modules": len(modules), "r": r, "entries": entries,
            "remainders": sum(m[1].numel() for m in modules) - entries,
            "stored": sum(t.numel() for k, t in tensors.items() if k.endswith(".shira_weight")),
            "bytes": weights.stat().st_size}
