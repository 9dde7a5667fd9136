"""Sparse deltas: save the entries a sparse fine-tune changed, apply them to a base model, remove them.

A delta is one safetensors file. For every parameter with changed entries it holds three
tensors, keyed by the parameter's name:

* ``<name>::indices``  int64, the flat (row-major) indices, strictly ascending;
* ``<name>::new``      the trained values at those indices, in the parameter's dtype;
* ``<name>::original`` the base model's values there, in the parameter's dtype;

and string metadata: ``format`` / ``format_version``, ``gem_kernels_version`` (the package
version that wrote it), ``tensors`` (JSON: per name its shape, dtype and ``base_sha256``, a
SHA-256 of the base values at the indices) and ``payload_sha256`` (a SHA-256 over every tensor
and every other metadata field), so a truncated or edited file is rejected.

What is stored: only entries whose value actually changed (compared bit for bit), not every
selected entry. A selected entry that training left unchanged needs no record to restore
either model, and the file stays O(changed) <= O(k). Parameters the optimizer trained densely
(groups with ``sparse=False``, e.g. a new classification head) are not part of a sparse delta:
``save_delta`` refuses them unless ``exclude_dense=True``; save those with their state dict.

``apply_delta`` and ``remove_delta`` are exact inverses: apply requires the model to hold the
original values at every index (bitwise) and writes the new ones; remove requires the new
values and writes the originals back. Both check the whole file against the model before
writing anything, so a rejected delta leaves the model untouched.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save

from . import __version__

FORMAT = "gem_kernels.delta"
FORMAT_VERSION = "1"
SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KEY_SEP = "::"
_PARTS = ("indices", "new", "original")
# Same-width integer views, so values are compared and hashed by their bits (NaN, -0.0 included).
_BITS_DTYPE = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _bits(values: torch.Tensor) -> torch.Tensor:
    return values.contiguous().view(_BITS_DTYPE[values.dtype])


def _sha256(values: torch.Tensor) -> str:
    return hashlib.sha256(values.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _payload_sha256(tensors: dict, metadata: dict) -> str:
    """SHA-256 over every metadata field except the checksum itself and every tensor's key,
    dtype, shape and bytes, in sorted key order (safetensors does not keep insertion order)."""
    digest = hashlib.sha256()
    fields = {k: v for k, v in metadata.items() if k != "payload_sha256"}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(json.dumps([key, _dtype_name(t.dtype), list(t.shape)]).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _named_parameters(model, layer_bases=()) -> dict:
    """The model's params by name, refusing tensor subclasses, except the ``layer_bases`` (ids of the
    4-bit bases of SparseDeltaLinear layers, whose entries are read through the layer)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = dict(model.named_parameters())
    for name, p in params.items():
        # A sharded (FSDP2/DTensor) param holds only its rank's rows: flat indices of the full
        # tensor would address the wrong entries.
        if type(p) not in (torch.Tensor, torch.nn.Parameter) and id(p) not in layer_bases:
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}; deltas read and write whole "
                            "tensors (for FSDP2, gather the full model state dict into a plain model first)")
    return params


def _gather(param: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return param.detach().reshape(-1)[indices]


def _scatter_(param: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    # unravel_index addresses the entries through the param's own strides, so this writes in
    # place also when the param is not contiguous (reshape(-1) would write into a copy).
    param.detach()[torch.unravel_index(indices, param.shape)] = values


# ---------------------------------------------------------------------------------------
# Save


def selected_rows(model, optimizer=None):
    """What a sparse fine-tune of ``model`` trains, from either path: ``(rows, dense)``.

    ``rows`` holds ``(name, param, indices, original, trained)`` per param with selected entries:
    those of ``optimizer`` (a SparseAdamW, the drop-in path) and those of the model's
    ``SparseDeltaLinear`` layers (the explicit path: the layer's base ``weight`` with its effective
    values; the optimizer's entries for a layer's ``values`` are the same ones, so they are not listed
    twice). ``dense`` lists ``(name, param)`` of the params trained otherwise: the optimizer's params
    without selected entries that require grad, or without an optimizer every param that requires
    grad and is no layer's ``values``. Index and original tensors are on the CPU.
    """
    from .nn import delta_values, trained_entries

    found = trained_entries(model)
    params = _named_parameters(model, layer_bases={id(weight) for weight in found})
    if optimizer is not None and not hasattr(optimizer, "selected_entries"):
        raise TypeError(f"optimizer must be a SparseAdamW (with selected_entries()), got "
                        f"{type(optimizer).__name__}")
    layer_values = delta_values(model)
    selected = optimizer.selected_entries() if optimizer is not None else {}
    name_of = {id(p): name for name, p in params.items()}
    unknown = [tuple(p.shape) for p in selected if id(p) not in name_of]
    if unknown:
        raise ValueError(f"optimizer holds {len(unknown)} selected parameter(s) that model does "
                         f"not contain (shapes {unknown[:3]}); pass the model the optimizer trains")
    with torch.no_grad():
        for p, (indices, original) in selected.items():
            if id(p) not in layer_values:
                found[p] = (indices, original, _gather(p, indices.to(p.device)))
    rows = [(name_of[id(p)], p, indices.to("cpu", torch.int64), original.detach().cpu(), trained.cpu())
            for p, (indices, original, trained) in found.items() if indices.numel()]
    if not rows:
        where = (f"optimizer has selected no entries yet (phase {getattr(optimizer, 'phase', '?')!r}); train "
                 "past selection first") if optimizer is not None else \
            "model has no SparseDeltaLinear layer; pass the SparseAdamW that trained it"
        raise ValueError(f"nothing to save: {where}")
    if optimizer is not None:
        candidates = [p for group in optimizer.param_groups for p in group["params"]]
    else:
        candidates = list(params.values())
    dense = [(name_of.get(id(p), f"<shape {tuple(p.shape)}>"), p) for p in candidates
             if p.requires_grad and p not in selected and id(p) not in layer_values]
    return rows, dense


def save_delta(model, path, optimizer=None, *, exclude_dense: bool = False) -> dict:
    """Writes the entries a sparse fine-tune trained and changed in ``model`` to ``path``: those of
    ``optimizer`` (a SparseAdamW) and of the model's ``SparseDeltaLinear`` layers (``optimizer`` may
    then be left out); see ``selected_rows``.

    Returns a summary: ``{"tensors": n, "entries": changed entries, "bytes": file size}``.
    """
    path = _check_path(path)
    if not isinstance(exclude_dense, bool):
        raise TypeError(f"exclude_dense must be a bool, got {type(exclude_dense).__name__}")
    rows, dense = selected_rows(model, optimizer)
    if dense and not exclude_dense:
        raise ValueError(f"{len(dense)} parameter(s) train densely, which a sparse delta "
                         f"does not hold: {[name for name, _ in dense][:5]}; save them with their state_dict "
                         "and pass exclude_dense=True")

    tensors, table = {}, {}
    changed_total = 0
    for name, param, indices, original, current in rows:
        if param.dtype not in _BITS_DTYPE:
            raise ValueError(f"parameter {name!r} has dtype {_dtype_name(param.dtype)}; a delta "
                             f"supports {sorted(SUPPORTED_DTYPES)}")
        if original.dtype != param.dtype or original.shape != indices.shape:
            raise ValueError(f"the original values for {name!r} are "
                             f"{_dtype_name(original.dtype)}{tuple(original.shape)}; expected "
                             f"{_dtype_name(param.dtype)}{tuple(indices.shape)}")
        changed = _bits(current) != _bits(original)
        if not bool(changed.any()):
            continue
        indices, original, current = indices[changed], original[changed], current[changed]
        tensors[f"{name}{_KEY_SEP}indices"] = indices.contiguous()
        tensors[f"{name}{_KEY_SEP}new"] = current.contiguous()
        tensors[f"{name}{_KEY_SEP}original"] = original.contiguous()
        table[name] = {"shape": list(param.shape), "dtype": _dtype_name(param.dtype),
                       "base_sha256": _sha256(original)}
        changed_total += indices.numel()

    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "gem_kernels_version": __version__, "tensors": json.dumps(table, sort_keys=True)}
    metadata["payload_sha256"] = _payload_sha256(tensors, metadata)
    blob = _safetensors_save(tensors, metadata=metadata)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name
    return {"tensors": len(table), "entries": changed_total, "bytes": len(blob)}


# ---------------------------------------------------------------------------------------
# Load and check


def _read_metadata(blob: bytes, path) -> dict:
    """The ``__metadata__`` of a safetensors blob (the header is an 8-byte length, then JSON)."""
    if len(blob) < 8:
        raise ValueError(f"delta file {path} is truncated ({len(blob)} bytes)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if 8 + header_len > len(blob):
        raise ValueError(f"delta file {path} is truncated: its header claims {header_len} bytes, "
                         f"the file has {len(blob) - 8}")
    try:
        header = json.loads(blob[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"delta file {path} has a corrupt header ({error})") from None
    # Parseable JSON is not enough: a list or a number here has no .get, and would crash below.
    if not isinstance(header, dict):
        raise ValueError(f"delta file {path} has a corrupt header (JSON {type(header).__name__}, "
                         f"not an object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"delta file {path} has a corrupt header (__metadata__ is JSON "
                         f"{type(metadata).__name__}, not an object)")
    return metadata


def _read_table(metadata: dict, path) -> dict:
    """The ``tensors`` table, every field of every entry checked before any is used. The checksum
    only proves the file is as written, and a forged file can carry a fresh one, so each field
    must have the type the code below relies on (a JSON ``1e400`` is a float infinity, ``true`` an int)."""
    try:
        table = json.loads(metadata["tensors"])
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"delta file {path} has no readable tensor table ({error})") from None
    if not isinstance(table, dict) or not all(isinstance(info, dict) for info in table.values()):
        raise ValueError(f"delta file {path} has no readable tensor table (not an object of objects)")
    for name, info in table.items():
        shape, dtype, sha = info.get("shape"), info.get("dtype"), info.get("base_sha256")
        if not (isinstance(shape, list)
                and all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape)):
            raise ValueError(f"delta file {path}: table entry {name!r} has shape {shape!r}; expected a list "
                             "of non-negative integers")
        if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"delta file {path}: table entry {name!r} has unsupported dtype {dtype!r}; "
                             f"expected one of {sorted(SUPPORTED_DTYPES)}")
        if not isinstance(sha, str):
            raise ValueError(f"delta file {path}: table entry {name!r} has base_sha256 {sha!r}; expected "
                             "a hex string")
    return table


def load_delta(path) -> dict:
    """Reads and checks a delta file on its own (no model): format, checksum, key set, dtypes,
    lengths, index range and order. Returns ``{name: {"shape", "dtype", "indices", "new",
    "original", "base_sha256"}}``."""
    return _load(path)[0]


def _load(path):
    blob = _check_path(path).read_bytes()
    metadata = _read_metadata(blob, path)
    _check_format(metadata, path)
    tensors = _read_payload(blob, metadata, path)
    table = _read_table(metadata, path)
    _check_keys(tensors, table, path)
    entries = {name: _read_entry(name, info, tensors) for name, info in table.items()}
    return entries, metadata


def _check_format(metadata: dict, path) -> None:
    """The file is a gem_kernels delta, of the format version this code reads."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a gem_kernels delta (format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"delta file {path} has format_version {metadata.get('format_version')!r}; "
                         f"this gem_kernels reads {FORMAT_VERSION!r}")


def _read_payload(blob: bytes, metadata: dict, path) -> dict:
    """The file's tensors, once they match the checksum its metadata records."""
    try:
        tensors = _safetensors_load(blob)
    except SafetensorError as error:
        raise ValueError(f"delta file {path} is truncated or corrupt ({error})") from None
    if metadata.get("payload_sha256") != _payload_sha256(tensors, metadata):
        raise ValueError(f"delta file {path} fails its checksum: the file was modified or damaged")
    return tensors


def _check_keys(tensors: dict, table: dict, path) -> None:
    """The file holds exactly the three tensors of each table entry."""
    expected_keys = {f"{name}{_KEY_SEP}{part}" for name in table for part in _PARTS}
    if set(tensors) != expected_keys:
        extra, missing = sorted(set(tensors) - expected_keys), sorted(expected_keys - set(tensors))
        raise ValueError(f"delta file {path} tensors do not match its table: extra {extra[:3]}, "
                         f"missing {missing[:3]}")


def _read_entry(name: str, info: dict, tensors: dict) -> dict:
    """One tensor's entry, checked: dtypes and lengths, the index range and order, the checksum
    of the original values."""
    indices, new, original = (tensors[f"{name}{_KEY_SEP}{part}"] for part in _PARTS)
    dtype = SUPPORTED_DTYPES[info["dtype"]]
    numel = math.prod(info["shape"])
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise ValueError(f"delta tensor {name!r}: indices must be 1-D int64, got "
                         f"{_dtype_name(indices.dtype)}{tuple(indices.shape)}")
    for part, values in (("new", new), ("original", original)):
        if values.dtype != dtype or values.shape != indices.shape:
            raise ValueError(f"delta tensor {name!r}: {part} values are "
                             f"{_dtype_name(values.dtype)}{tuple(values.shape)}, expected "
                             f"{info['dtype']}{tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise ValueError(f"delta tensor {name!r}: indices out of range [0, {numel}) "
                         f"(min {int(indices.min())}, max {int(indices.max())})")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"delta tensor {name!r}: indices are not strictly ascending")
    if info["base_sha256"] != _sha256(original):
        raise ValueError(f"delta tensor {name!r}: original values do not match base_sha256")
    return dict(info, shape=tuple(info["shape"]), dtype=dtype, indices=indices, new=new, original=original)


def _check_against_model(model, path, expect: str):
    """Validates the whole delta against ``model`` and returns the (param, indices, values to
    write) list; ``expect`` is "original" (apply) or "new" (remove). Writes nothing."""
    from .nn import SparseDeltaLinear

    params = _named_parameters(model)
    layers = [name for name, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]
    if layers:  # a write into a layer's base would add to its trained values, not replace them
        raise ValueError(f"model has SparseDeltaLinear layers ({layers[:3]}); a delta applies to a model of "
                         "plain modules: gem_kernels.merge_(model) first, or apply it to the base model")
    entries, _ = _load(path)
    writes = []
    for name, entry in entries.items():
        param = params.get(name)
        if param is None:
            raise ValueError(f"delta tensor {name!r} is not a parameter of this model")
        if tuple(param.shape) != entry["shape"]:
            raise ValueError(f"delta tensor {name!r} has shape {entry['shape']} but the model's "
                             f"parameter has shape {tuple(param.shape)}")
        if param.dtype != entry["dtype"]:
            raise ValueError(f"delta tensor {name!r} has dtype {_dtype_name(entry['dtype'])} but the "
                             f"model's parameter has dtype {_dtype_name(param.dtype)}")
        indices = entry["indices"].to(param.device)
        current = _gather(param, indices).cpu()
        other = "new" if expect == "original" else "original"
        mismatched = int((_bits(current) != _bits(entry[expect])).sum())
        if mismatched:
            if expect == "original":
                if _sha256(current) == _sha256(entry["new"]):
                    problem = "the delta is already applied"
                else:
                    problem = "the delta was made for a different base model"
            else:
                problem = ("the delta is not applied (the model holds its original values)"
                           if _sha256(current) == _sha256(entry["original"])
                           else "the delta is not applied to this model (values differ)")
            raise ValueError(f"{problem}: parameter {name!r} differs from the delta's {expect} "
                             f"values at {mismatched} of {indices.numel()} entries; model unchanged")
        writes.append((param, indices, entry[other].to(param.device)))
    return writes


def apply_delta(model, path) -> int:
    """Writes the delta's new values into ``model`` (bitwise exact). Returns the entries written.

    Raises ValueError, with the model untouched, if the file is damaged or was made for another
    base model, or the model lacks one of its tensors (name, shape, dtype)."""
    with torch.no_grad():
        writes = _check_against_model(model, path, expect="original")
        for param, indices, values in writes:
            _scatter_(param, indices, values)
    return sum(indices.numel() for _, indices, _ in writes)


def remove_delta(model, path) -> int:
    """Restores the base values a delta replaced (exact inverse of ``apply_delta``). Returns the
    entries written. Raises ValueError, model untouched, unless the delta is applied."""
    with torch.no_grad():
        writes = _check_against_model(model, path, expect="new")
        for param, indices, values in writes:
            _scatter_(param, indices, values)
    return sum(indices.numel() for _, indices, _ in writes)
