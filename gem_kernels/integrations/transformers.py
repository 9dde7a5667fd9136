"""Param groups for ``SparseAdamW`` from module-name patterns, for ``transformers`` models.

    groups = param_groups(model, sparse=["query", "value"], dense=["classifier"], weight_decay=0.01)
    opt = SparseAdamW(groups, lr=1e-3, density=1e-3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(opt, get_linear_schedule_with_warmup(opt, 0, steps)))

A pattern names modules the way ``peft``'s ``target_modules`` does: it matches a module whose
dotted name equals it or ends with ``"." + pattern`` (``"query"`` matches
``bert.encoder.layer.0.attention.self.query``). Of a ``sparse`` module only the weight
matrices (``dim >= 2``) train, on the selected entries; its biases stay frozen unless a
``dense`` pattern names them too. Every parameter of a ``dense`` module trains as in AdamW.
Everything else is frozen (``requires_grad=False``), so backward computes no gradient for it.

``Trainer`` itself trains with a ``SparseAdamW`` (its gradients are torch's dense ones).
``SparseTrainer`` is ``Trainer`` that refuses to resume from a checkpoint without the optimizer's
state, which a fresh SparseAdamW would replace by a new selection of other entries.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch


def _matches(module_name: str, pattern: str) -> bool:
    return module_name == pattern or module_name.endswith("." + pattern)


def _check_patterns(name: str, patterns) -> list[str]:
    if isinstance(patterns, str):
        raise TypeError(f"{name} must be a list of module-name patterns, not the string {patterns!r}")
    patterns = list(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{name} holds {pattern!r}; patterns are non-empty strings")
    return patterns


def matching_parameters(model: torch.nn.Module, patterns: Iterable[str]) -> dict[str, torch.nn.Parameter]:
    """``{name: parameter}`` of the parameters that belong directly to a module matching a pattern."""
    patterns = _check_patterns("patterns", patterns)
    found, used = {}, set()
    for module_name, module in model.named_modules():
        hits = [p for p in patterns if _matches(module_name, p)]
        if not hits:
            continue
        used.update(hits)
        for param_name, param in module.named_parameters(recurse=False):
            found[f"{module_name}.{param_name}"] = param
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ValueError(f"no module of {type(model).__name__} matches {unused}")
    return found


def param_groups(model: torch.nn.Module, sparse: Iterable[str] = (), dense: Iterable[str] = (),
                 weight_decay: float = 0.0) -> list[dict]:
    """A sparse group (weight matrices of ``sparse`` modules) and a dense group (all of the
    ``dense`` modules' parameters) for ``SparseAdamW``; freezes every other parameter.

    Params are given as ``(name, tensor)`` pairs, so the optimizer's ``selection_report()``
    names them. Raises ValueError when a pattern matches nothing, when a parameter is
    claimed by both lists, or when no parameter is left to train sparsely.
    """
    sparse = _check_patterns("sparse", sparse)
    dense = _check_patterns("dense", dense)
    sparse_params = {n: p for n, p in matching_parameters(model, sparse).items() if p.dim() >= 2} if sparse else {}
    dense_params = matching_parameters(model, dense) if dense else {}
    both = sorted(set(sparse_params) & set(dense_params))
    if both:
        raise ValueError(f"{both[:3]} matched both sparse and dense patterns; each parameter goes in one group")
    if not sparse_params:
        raise ValueError(f"sparse={sparse} matched no weight matrix (dim >= 2) to train sparsely")
    trainable = set(sparse_params) | set(dense_params)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    groups = [{"params": list(sparse_params.items()), "sparse": True, "weight_decay": weight_decay}]
    if dense_params:
        groups.append({"params": list(dense_params.items()), "sparse": False, "weight_decay": weight_decay})
    return groups


def _sparse_trainer_class():
    from transformers import Trainer

    class SparseTrainer(Trainer):
        """``transformers.Trainer`` that refuses a resume without the optimizer's state."""

        def train(self, resume_from_checkpoint=None, **kwargs):
            """As Trainer's, but a checkpoint without the optimizer's state is refused before
            anything loads: a fresh SparseAdamW would calibrate again and train other entries."""
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                from transformers.trainer_utils import get_last_checkpoint
                checkpoint = get_last_checkpoint(self.args.output_dir)  # None: Trainer says so
            if isinstance(checkpoint, (str, os.PathLike)) and os.path.isdir(checkpoint) \
                    and not any("optimizer" in name for name in os.listdir(checkpoint)):
                raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} holds no optimizer state (optimizer.pt): "
                                 "SparseAdamW cannot resume without it (a fresh one would calibrate again and "
                                 "train other entries); resume from a checkpoint saved with it, or start anew")
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    return SparseTrainer


def __getattr__(name):
    # Built on first use so that importing the param-group helpers does not import Trainer.
    if name == "SparseTrainer":
        return _sparse_trainer_class()
    raise AttributeError(name)
