"""Text-to-image with a diffusers pipeline (Stable Diffusion 1.5 in GIFT's paper).

``DiffusersGenerator`` loads any text-to-image pipeline through
``AutoPipelineForText2Image.from_pretrained`` (a hub id, downloaded and cached on the
user's machine, or a local folder), draws every image from its own seeded
``torch.Generator`` (so an image depends only on its prompt and seed, not on the batch it
was drawn in) and drops near-black images, which is what the safety checker outputs.

``build_tiny_pipeline`` writes a small random Stable Diffusion pipeline (32x32 images)
to a folder: it runs offline in well under a second per batch on a CPU, for tests and
throughput checks.

diffusers is imported on first use only (importing it takes seconds).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cl_proxyfda.device import resolve_device
from cl_proxyfda.errors import UserError
from cl_proxyfda.generators.cache import BLACK_THRESHOLD, GeneratedBatch, is_near_black
from cl_proxyfda.hub import fetch, hub_offline, pipeline_files
from cl_proxyfda.registry import GENERATORS

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SCHEDULER_NAMES = ("dpm", "ddim", "euler")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def scheduler_classes() -> dict[str, Any]:
    """Scheduler names of the config mapped to diffusers classes."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    return {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA and fp32 elsewhere; ``fp16``/``bf16``/``fp32`` as named."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"generator.dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class DiffusersGenerator:
    """Prompts + seeds in, PIL images out, through a diffusers text-to-image pipeline.

    ``generate_kept`` returns the kept images with their indices in the request;
    near-black images (every pixel value < ``black_threshold``, or flagged by a safety
    checker) are dropped when ``drop_black`` and counted in ``self.dropped``.
    ``generate`` returns the kept images only. The pipeline is loaded on first use.
    """

    name = "diffusers"

    def __init__(
        self,
        model: str = SD15,
        scheduler: str | None = None,
        steps: int = 50,
        guidance: float = 7.5,
        batch_size: int = 8,
        height: int | None = None,
        width: int | None = None,
        dtype: str = "auto",
        device: str = "auto",
        drop_black: bool = True,
        black_threshold: int = BLACK_THRESHOLD,
        progress: bool = True,
    ) -> None:
        if scheduler is not None and scheduler not in SCHEDULER_NAMES:
            raise UserError(f"generator.scheduler: {scheduler!r} is not one of {', '.join(SCHEDULER_NAMES)} (or null for the pipeline's own)")
        if steps < 1 or batch_size < 1:
            raise UserError("generator.steps and generator.batch_size must be >= 1")
        self.model = str(model)
        self.scheduler = scheduler
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.batch_size = int(batch_size)
        self.height = height
        self.width = width
        self.device = resolve_device(device, "generator.device")
        self.dtype = resolve_dtype(dtype, self.device)
        self.drop_black = drop_black
        self.black_threshold = int(black_threshold)
        self.progress = progress
        self.dropped = 0
        self.pipeline_calls = 0
        self._pipe: Any = None

    @property
    def config_id(self) -> str:
        """What decides the images (model, scheduler, steps, guidance, size): the cache's key."""
        return json.dumps(
            {"backend": self.name, "model": self.model, "scheduler": self.scheduler, "steps": self.steps,
             "guidance": self.guidance, "height": self.height, "width": self.width},
            sort_keys=True,
        )

    @property
    def local_files_only(self) -> bool:
        return Path(self.model).expanduser().is_dir() or hub_offline()

    def load(self) -> Any:
        """The pipeline, loaded on first call (on ``self.device`` in ``self.dtype``)."""
        if self._pipe is not None:
            return self._pipe
        from diffusers import AutoPipelineForText2Image

        local = Path(self.model).expanduser()
        source = str(local) if local.is_dir() else self.model
        if not local.is_dir() and (self.model.startswith((".", "~")) or os.path.isabs(self.model)):
            raise UserError(f"generator.model: folder {self.model} does not exist")
        fetch(pipeline_files(self.model))  # a failed download is one line naming the repository
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(source, local_files_only=self.local_files_only)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"generator.model: cannot load pipeline {self.model!r}: {first}") from None
        if self.scheduler is not None:
            pipe.scheduler = scheduler_classes()[self.scheduler].from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe.to(device=self.device, dtype=self.dtype)
        return self._pipe

    def generate_kept(self, prompts: Sequence[str], seeds: Sequence[int]) -> GeneratedBatch:
        """Images for ``prompts`` (one seeded generator each), near-black ones left out."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        pipe = self.load()
        images: list[Image.Image] = []
        kept: list[int] = []
        starts = range(0, len(prompts), self.batch_size)
        for start in tqdm(starts, desc="text-to-image", disable=not self.progress or len(starts) <= 1):
            batch_prompts = [str(p) for p in prompts[start : start + self.batch_size]]
            # CPU generators: the initial noise is the same on every device.
            generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[start : start + self.batch_size]]
            out = pipe(
                prompt=batch_prompts,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance,
                generator=generators,
                height=self.height,
                width=self.width,
                output_type="pil",
            )
            self.pipeline_calls += 1
            flags = getattr(out, "nsfw_content_detected", None) or [False] * len(batch_prompts)
            for j, (img, flagged) in enumerate(zip(out.images, flags)):
                if self.drop_black and (bool(flagged) or is_near_black(img, self.black_threshold)):
                    self.dropped += 1
                    continue
                images.append(img.convert("RGB"))
                kept.append(start + j)
        return GeneratedBatch(images, kept)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """The kept images (all of them unless near-black ones were dropped)."""
        return self.generate_kept(prompts, seeds).images


class DiffusersParams(BaseModel):
    """YAML arguments of the ``diffusers`` generator."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(SD15, description="hub id or local folder of a text-to-image pipeline")
    scheduler: Literal["dpm", "ddim", "euler"] | None = Field(None, description="null: the pipeline's own scheduler")
    steps: int = Field(50, ge=1, le=10_000)
    guidance: float = Field(7.5, ge=0)
    batch_size: int = Field(8, ge=1, le=65536)
    height: int | None = Field(None, ge=8, le=8192)
    width: int | None = Field(None, ge=8, le=8192)
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    device: str = Field("auto", description="auto: the run's device, else CUDA when present")
    drop_black: bool = True
    black_threshold: int = Field(BLACK_THRESHOLD, ge=1, le=256)
    progress: bool = True


@GENERATORS.register("diffusers", DiffusersParams, help="a diffusers text-to-image pipeline (Stable Diffusion 1.5 by default)")
def build_diffusers_generator(params: DiffusersParams, device: str | torch.device | None = None, **_context: Any) -> DiffusersGenerator:
    """The registry's factory: ``device: auto`` follows the run's device when given."""
    args = params.model_dump()
    if args["device"] == "auto" and device is not None:
        args["device"] = str(device)
    return DiffusersGenerator(**args)


def _write_open_clip_bpe(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of open_clip's bundled BPE vocabulary (no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
    ranked = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    merges.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in ranked), encoding="utf-8")
    return vocab, merges


def build_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Stable Diffusion pipeline (32x32 images) to ``path``.

    UNet (32, 64) channels with cross-attention dim 32, a (32, 64) VAE, a 2-layer CLIP
    text encoder of width 32 and a CLIPTokenizer over open_clip's BPE vocabulary; no
    safety checker. Same ``seed``, same weights. Returns ``path``.
    """
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = _write_open_clip_bpe(Path(tmp))
        specials = {"bos_token": "<start_of_text>", "eos_token": "<end_of_text>", "unk_token": "<end_of_text>", "pad_token": "<end_of_text>"}
        tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77, **specials)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path
