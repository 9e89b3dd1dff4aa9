"""Time of one FDA / Proxy-FDA loss step alone (graph, generator, proxies, both losses,
backward, the plugin's own optimizer step; no backbone) at batch 64, dim 512, one thread
(the median of ``torch.utils.benchmark.Timer.blocked_autorange`` over 2 s).

Run: ``OMP_NUM_THREADS=1 python tools/fda_step_time.py`` (the same measurement as the
notes of ``cl-proxyfda bench --sections steps``, without the rest of the bench).
"""
from __future__ import annotations

import torch

from cl_proxyfda.tools.bench import fda_loss_seconds


def main() -> None:
    torch.set_num_threads(1)
    for proxies in (False, True):
        seconds = fda_loss_seconds(512, 64, proxies, torch.device("cpu"), min_run_time=2.0)
        print(f"{'proxy_fda' if proxies else 'fda'}: {1000 * seconds:.2f} ms per step (batch 64, dim 512, one thread)")


if __name__ == "__main__":
    main()
