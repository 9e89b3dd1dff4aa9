"""The ``gpu`` section (CUDA only): CLIP ViT-B/16 naive / Proxy-FDA / GIFT step times in
fp32 and bf16, and an SD-1.5-sized UNet's images per second."""
from __future__ import annotations

from typing import Any

import torch

from cl_proxyfda.tools.bench.context import BenchContext
from cl_proxyfda.tools.bench.presets import strategy_presets
from cl_proxyfda.tools.bench.report import Section
from cl_proxyfda.tools.bench.step_timer import StepEntry, measure_steps
from cl_proxyfda.tools.bench.timing import seconds_per_call


SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
"""Stable Diffusion 1.5's UNet configuration (random weights are enough for timings)."""


def unet_images_per_second(config: dict[str, Any], device: torch.device, dtype: torch.dtype, batch: int, steps: int,
                           text_len: int = 77, min_run_time: float = 1.0) -> float:
    """Images per second of ``steps`` denoising steps with classifier-free guidance
    (UNet on 2 x batch latents per step, DPM-Solver scheduler); no VAE or text encoder.
    The median generation of ``Timer.blocked_autorange(min_run_time)``, whose block-size
    estimate (at least one generation) is the warm-up."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval()
    size = int(config["sample_size"])
    cond = torch.randn(2 * batch, text_len, int(config["cross_attention_dim"]), device=device, dtype=dtype)

    def generate(n_steps: int) -> None:
        scheduler = DPMSolverMultistepScheduler()
        scheduler.set_timesteps(n_steps)
        latents = torch.randn(batch, int(config["in_channels"]), size, size, device=device, dtype=dtype)
        with torch.no_grad():
            for t in scheduler.timesteps:
                noise = unet(torch.cat([latents, latents]), t, encoder_hidden_states=cond).sample
                uncond, text = noise.chunk(2)
                latents = scheduler.step(uncond + 7.5 * (text - uncond), t, latents).prev_sample

    seconds = seconds_per_call(lambda: generate(steps), min_run_time)
    return batch / seconds  # unet is freed with the closure


def gpu_section(ctx: BenchContext, device: torch.device | None = None, clip_model: str | None = None,
                unet_config: dict[str, Any] | None = None, unet_dtype: torch.dtype | None = None) -> Section:
    """CLIP step times at both precisions and the UNet's images/s (CUDA; the arguments let
    the same code run on small stand-ins)."""
    section = Section("gpu", "CLIP ViT-B/16 step times (fp32, bf16) and an SD-1.5-sized UNet")
    if device is None:
        if not torch.cuda.is_available():
            section.skipped = "no CUDA device"
            return section
        device = torch.device("cuda")
    s = ctx.sizes
    clip_model = clip_model or s.gpu_model
    gift = next(e for e in strategy_presets(ctx, s.gpu_batch_size) if e.label == "gift")
    kinds = [("naive", [{"name": "naive"}]), ("proxy_fda (teacher forward)", [{"name": "proxy_fda"}]),
             ("gift (synthetic batch + distillation)", gift.strategies)]
    precisions = ("fp32", "bf16")
    entries = [StepEntry(f"{p} {label}", strategies, precision=p) for p in precisions for label, strategies in kinds]
    results, notes = measure_steps(ctx, entries, batch_size=s.gpu_batch_size, model=clip_model, pretrained=None, device=device)
    section.notes += notes
    section.columns = ["precision", "strategy", "median ms", "x naive (same precision)", "teacher fwd %", "bf16 speed-up"]
    by = {r.label: r for r in results}
    for p in precisions:
        base = by.get(f"{p} naive")
        for label, _ in kinds:
            r = by.get(f"{p} {label}")
            if base is None or r is None:
                continue
            ratio = section.add_ratio(f"{p}/{label}", r.median / base.median)
            fp32 = by.get(f"fp32 {label}")
            speed = section.add_ratio(f"bf16_speedup/{label}", fp32.median / r.median) if p == "bf16" and fp32 is not None else None
            section.rows.append([p, label, 1000 * r.median, ratio, 100 * r.teacher_share, speed])
    del results, by
    if device.type == "cuda":
        torch.cuda.empty_cache()
    config = unet_config or SD15_UNET
    dtype = unet_dtype or torch.float16
    ips = unet_images_per_second(config, device, dtype, s.gpu_unet_batch, s.gpu_unet_steps)
    section.extra["unet_images_per_second"] = ips
    section.notes.append(
        f"SD-1.5-sized UNet ({'SD 1.5 config' if unet_config is None else 'given config'}, random weights, {str(dtype).replace('torch.', '')}): "
        f"{ips:.2f} images/s at {s.gpu_unet_steps} steps with classifier-free guidance, batch {s.gpu_unet_batch}, "
        f"{config['sample_size']}x{config['sample_size']} latents; "
        "UNet and scheduler only (no text encoder, no VAE decode); median generation of Timer.blocked_autorange."
    )
    section.setting = (
        f"{clip_model} (open_clip, random weights), image tower trained, {ctx.describe_stream()} (images resized by the model's transform), "
        f"batch {s.gpu_batch_size}, {device.type}; median of {s.iterations} timed iterations x {s.repeats} repeats, all six runs interleaved; "
        "bf16 = torch.autocast (run.precision: bf16)."
    )
    return section


# ---------------------------------------------------------------------- driver
