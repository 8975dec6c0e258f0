"""Test configuration.

Scripts that tests run in subprocesses are not test modules. Under pytest-xdist each worker
gets its share of the cores for torch's intra-op threads (and so do the processes it
starts): with ``-n 2`` on 2 cores, two workers of 2 threads each make every parallel op wait
for a thread the other worker has descheduled — measured, a 2-MB ``relu_`` then takes ~8 ms
instead of ~0.1 ms, and the suite took 744 s instead of 241 s.
"""

from __future__ import annotations

import os

collect_ignore = ["ddp_script.py"]

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    import torch

    _threads = str(max(1, (os.cpu_count() or 1) // _workers))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)  # inherited by subprocesses (DDP tests)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
