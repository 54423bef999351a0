"""Failure cases under a 2-rank job: `mismatch` (rank 1 compiles another model), `weights` (rank 1 has other
weights), `kill` (rank 1 dies mid-run) or `hang` (rank 1 stops issuing collectives but lives)."""
import os
import signal
import sys
import time

import torch

import einfuse
from einfuse.models import tiny_decoder

case = sys.argv[1]
rank = int(os.environ["RANK"])
layers = 1 if case == "mismatch" and rank == 1 else 2
model = tiny_decoder("llama", num_hidden_layers=layers, seed=1 if case == "weights" and rank == 1 else 0)
ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
try:
    cm = einfuse.compile(model, (ids,), backend="torch", dist=einfuse.Dist(tp=2, timeout_s=20 if case != "hang" else 15))
    with torch.no_grad():
        for step in range(400):
            if case == "kill" and rank == 1 and step == 3:
                print(f"KILLED {time.time():.3f}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if case == "hang" and rank == 1 and step == 3:
                print(f"HANGS {time.time():.3f}", flush=True)
                time.sleep(40)
                os._exit(4)
            cm(ids)
            time.sleep(0.01)
except Exception as exc:  # noqa: BLE001
    print(f"ERROR rank {rank} at {time.time():.3f}: {type(exc).__name__}: {exc}", flush=True)
    os._exit(3)
print(f"DONE rank {rank}", flush=True)
