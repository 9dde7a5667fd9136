"""Sparse instruction tuning of a decoder (LlamaForCausalLM) with SparseAdamW in ``SparseTrainer``.

    python examples/causal_lm_example.py --out runs/causal-lm-example
    python examples/causal_lm_example.py --targets all-linear --export-peft runs/causal-lm-example/shira

Reads question/answer pairs from a JSONL file (``examples/data/instructions.jsonl``, one
``{"question": ..., "answer": ...}`` object a line), builds a character-level tokenizer from
them and a small Llama from a config (nothing is downloaded), and fine-tunes it with GEM: the
first ``--calibration-steps`` optimizer steps only sum the gradients, then ``--density`` of the
model's size is trained in the query/value projections (``--targets qv``) or in every Linear of
the decoder layers (``--targets all-linear``; the output head is left out, as peft's
"all-linear" does). The loss counts the answer tokens only: the prompt and the padding carry
label -100. The run stops halfway (``--stop-at``), then a fresh Trainer resumes from that
checkpoint and finishes, as a restarted job would, and the two final models are compared.
``--export-peft DIR`` writes the trained entries as a peft SHiRA adapter.

A model built from a config knows nothing that a sparse update could adapt, so here the loss
falls only a little: the example shows the wiring (prompt masking, GEM's calibration and
selection, checkpoint and resume, export), not what sparse tuning of a pretrained model reaches.
With a pretrained decoder, load it and its tokenizer with ``from_pretrained`` instead and build
``input_ids``/``labels`` the same way (prompt tokens labelled -100); the rest stays as it is.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments, get_linear_schedule_with_warmup

from gem_kernels.integrations.transformers import SparseTrainer, param_groups
from gem_kernels.optim import SparseAdamW
from gem_kernels.selectors import GEM

DATA = Path(__file__).resolve().parent / "data" / "instructions.jsonl"
PROMPT = "Question: {question}\nAnswer: "
IGNORE = -100  # the label value torch's cross_entropy (and so the model's loss) skips
TARGETS = {"qv": ["q_proj", "v_proj"]}  # "all-linear" is found from the model, see target_modules()


def read_jsonl(path) -> list[dict]:
    """The ``{"question", "answer"}`` rows of a JSONL file; a bad line raises naming it."""
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            if not (isinstance(row, dict) and isinstance(row.get("question"), str)
                    and isinstance(row.get("answer"), str) and row["answer"]):
                raise ValueError(f"{path}:{number}: expected an object with string \"question\" and "
                                 f"non-empty \"answer\", got {line.strip()[:80]!r}")
            rows.append({"question": row["question"], "answer": row["answer"]})
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


class CharTokenizer:
    """One token per character of the training text, plus pad/bos/eos/unk: enough for a model
    built from a config, and the same vocabulary every time the same data is read."""

    SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]

    def __init__(self, texts):
        chars = sorted({c for text in texts for c in text})
        self.vocab = self.SPECIAL + chars
        self.ids = {token: i for i, token in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)

    def __len__(self):
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(c, self.unk_id) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids if i >= len(self.SPECIAL))


def build_tokenizer(rows) -> CharTokenizer:
    return CharTokenizer([PROMPT.format(question=r["question"]) + r["answer"] for r in rows])


def encode_example(tokenizer: CharTokenizer, question: str, answer: str, max_length: int) -> dict:
    """``input_ids`` = bos + prompt + answer + eos; ``labels`` the same with the prompt (and bos)
    set to -100, so the loss is the answer's. A long answer is cut, keeping the whole prompt."""
    prompt = [tokenizer.bos_id] + tokenizer.encode(PROMPT.format(question=question))
    target = tokenizer.encode(answer) + [tokenizer.eos_id]
    if len(prompt) >= max_length:
        raise ValueError(f"the prompt of {question[:40]!r} is {len(prompt)} tokens, which leaves no room "
                         f"for its answer within max_length={max_length}")
    input_ids = (prompt + target)[:max_length]
    labels = ([IGNORE] * len(prompt) + target)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class Collator:
    """Pads a batch on the right: pad id in ``input_ids``, 0 in ``attention_mask``, -100 in ``labels``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE}
        return {key: torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features])
                for key, value in fill.items()}


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)  # the same seed, the same base model (a resume needs the same start)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def target_modules(model, targets: str) -> list[str]:
    """Module-name patterns to train sparsely: q_proj/v_proj, or every Linear but the output head."""
    if targets == "all-linear":
        head = model.get_output_embeddings()
        return [name for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and module is not head]
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {sorted(TARGETS) + ['all-linear']}, got {targets!r}")
    return TARGETS[targets]


def make_trainer(model, train_data, pad_id: int, out_dir, *, targets: str = "qv", max_steps: int,
                 save_steps: int, lr: float, density: float, calibration_steps: int, batch_size: int,
                 seed: int = 0) -> SparseTrainer:
    groups = param_groups(model, sparse=target_modules(model, targets), weight_decay=0.0)
    # The budget is counted over the whole model (the GEM paper's 0.1 % of all parameters),
    # not over the weights that hold it.
    budget = max(1, round(density * sum(p.numel() for p in model.parameters())))
    optimizer = SparseAdamW(groups, lr=lr, budget=budget, selector=GEM(), calibration_steps=calibration_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=max_steps)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        save_strategy="steps", save_steps=save_steps, logging_steps=max(1, save_steps // 2), max_grad_norm=1.0,
        seed=seed, data_seed=seed, report_to="none", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True)
    # SparseTrainer is Trainer (which measures and clips the dense gradients as with AdamW) that
    # refuses to resume from a checkpoint without the optimizer's state.
    return SparseTrainer(model=model, args=args, train_dataset=train_data, optimizers=(optimizer, scheduler),
                         data_collator=Collator(pad_id))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA), help="JSONL file of {\"question\", \"answer\"} lines")
    parser.add_argument("--out", default="runs/causal-lm-example")
    parser.add_argument("--targets", default="qv", choices=["qv", "all-linear"])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--stop-at", type=int, default=30, help="checkpoint step to resume from")
    parser.add_argument("--calibration-steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--density", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--export-peft", metavar="DIR", help="also write the result as a peft SHiRA adapter")
    args = parser.parse_args(argv)
    if not 0 < args.stop_at < args.max_steps:
        parser.error(f"--stop-at must be between 0 and --max-steps ({args.max_steps}), got {args.stop_at}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rows = read_jsonl(args.data)
    tokenizer = build_tokenizer(rows)
    train_data = [encode_example(tokenizer, r["question"], r["answer"], args.max_length) for r in rows]
    settings = dict(targets=args.targets, max_steps=args.max_steps, save_steps=args.stop_at, lr=args.lr,
                    density=args.density, calibration_steps=args.calibration_steps, batch_size=args.batch_size)

    first = make_trainer(tiny_llama(len(tokenizer)), train_data, tokenizer.pad_id, Path(args.out), **settings)
    result = first.train()
    optimizer = first.optimizer.optimizer  # the SparseAdamW inside accelerate's wrapper
    print(f"trained {args.max_steps} steps, mean loss {result.training_loss:.3f}; phase {optimizer.phase}, "
          f"{optimizer.selected_count()} entries selected in {args.targets}")

    resumed = make_trainer(tiny_llama(len(tokenizer)), train_data, tokenizer.pad_id, Path(args.out), **settings)
    resumed.train(resume_from_checkpoint=str(Path(args.out) / f"checkpoint-{args.stop_at}"))
    same = all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                  resumed.model.state_dict().values()))
    print(f"resumed from checkpoint-{args.stop_at}: final weights {'identical' if same else 'DIFFERENT'}")

    if args.export_peft:
        from gem_kernels import export_peft_shira

        summary = export_peft_shira(first.model, optimizer, args.export_peft)
        print(f"peft SHiRA adapter in {args.export_peft}: {summary['modules']} modules, r={summary['r']}, "
              f"{summary['entries']} trained entries ({summary['stored']} stored)")
    return {"trainer": first, "resumed": resumed, "same": same, "tokenizer": tokenizer}


if __name__ == "__main__":
    main()
