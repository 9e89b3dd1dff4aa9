"""Do Proxy-FDA's proxies change the feature gradient, or only scale it?

On CLIP-like features (``cl_proxyfda.testing.clip_like_features``, 64 x 512) with a
slightly drifted student, runs Proxy-FDA and plain FDA side by side for 200 steps (the
generator trains as in a run) and prints the cosine between their feature gradients over
the last 50 steps, their norm ratio, and the proxy diagnostics.

Run: ``OMP_NUM_THREADS=1 python tools/fda_proxy_gradient.py`` (about 20 s on one thread).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_proxyfda.strategies.proxy_fda import FDAParams, ProxyFDAParams, ProxyFDAPlugin
from cl_proxyfda.testing import clip_like_features


def main(steps: int = 200, last: int = 50) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    proxy, plain = ProxyFDAPlugin(ProxyFDAParams(k=8)), ProxyFDAPlugin(FDAParams(k=8))
    cosines, ratios = [], []
    for step in range(steps):
        zh, labels = clip_like_features(64, 512, seed=step)
        drifted = F.normalize(zh + 0.05 * torch.randn_like(zh), dim=1)
        grads = []
        for plugin in (proxy, plain):
            z = drifted.clone().requires_grad_(True)
            loss, gen_loss = plugin.losses(z, zh, labels)
            (loss + (gen_loss if gen_loss is not None else 0.0)).backward()
            grads.append(z.grad.flatten())
            plugin.after_update(None)
        if step >= steps - last:
            cosines.append(float(F.cosine_similarity(grads[0], grads[1], dim=0)))
            ratios.append(float(grads[0].norm() / grads[1].norm()))
    print(f"feature-gradient cosine, Proxy-FDA vs FDA, last {last} of {steps} steps: mean {sum(cosines) / len(cosines):.3f}, min {min(cosines):.3f}")
    print(f"gradient norm ratio (Proxy-FDA / FDA): mean {sum(ratios) / len(ratios):.2f}")
    proxy.after_training_exp(None)
    print("proxy diagnostics:", {k: round(v, 3) for k, v in proxy.diagnostics.items()})


if __name__ == "__main__":
    main()
