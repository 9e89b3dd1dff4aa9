"""Run under torchrun by tests/test_distributed.py: each process feeds Proxy-FDA different
features; after a step, every process must hold the same tau, b and generator."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cl_proxyfda.registry import STRATEGIES, load_builtin_components


class Strategy:
    """What the plugin reads from an Avalanche strategy, for one batch."""

    def __init__(self, z: torch.Tensor, zh: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss = torch.zeros(())
        self.mb_y = labels
        self._z, self._zh = z, zh


def main() -> None:
    load_builtin_components()  # Avalanche must be imported before the process group exists
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # different initial RNG: the generator must still agree
    plugin = STRATEGIES.build("proxy_fda", {"k": 3, "learn_tau_bias": True})
    import cl_proxyfda.strategies.proxy_fda as module

    for step in range(3):
        z = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(10 * rank + step)), dim=1).requires_grad_()
        zh = F.normalize(z.detach() + 0.1 * torch.randn(8, 16), dim=1)
        strategy = Strategy(z, zh, torch.arange(8) // 2)
        module.ProxyFDAPlugin._student_features = lambda self, s: s._z  # type: ignore[method-assign]
        module.ProxyFDAPlugin._teacher_features = lambda self, s: s._zh  # type: ignore[method-assign]
        plugin.before_backward(strategy)
        strategy.loss.backward()
        plugin.after_update(strategy)
    flat = torch.cat([p.detach().flatten() for p in [plugin.head.log_tau, plugin.head.bias, *plugin.generator.parameters()]])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    moved = abs(plugin.tau - 0.1) > 1e-6
    print(f"rank {rank}: same={same} moved={moved}")
    dist.destroy_process_group()
    sys.exit(0 if same and moved else 1)


if __name__ == "__main__":
    main()
