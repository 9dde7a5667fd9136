"""Runs a test body in two gloo processes on CPU (tests/test_distributed.py, tests/test_fsdp.py).

``spawn(fn, *args)`` calls ``fn(rank, tmpdir, *args)`` on each rank with the process group set up;
``mp.spawn`` re-raises a worker's error in the test with its traceback.
"""
import gc
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _entry(rank, fn, init_file, tmpdir, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        fn(rank, tmpdir, *args)
        # Collect reference cycles (FSDP2's modules sit in some) and the collectives' work objects
        # they hold while the process group lives: left to interpreter shutdown, gloo sometimes
        # aborts the process ("terminate called without an active exception").
        gc.collect()
        dist.barrier()  # no rank leaves (closing its sockets) while another is still in a collective
    finally:
        dist.destroy_process_group()


def spawn(fn, *args):
    with tempfile.TemporaryDirectory() as tmpdir:
        mp.spawn(_entry, args=(fn, os.path.join(tmpdir, "init"), tmpdir, args), nprocs=WORLD, join=True)
