"""Load a Flux pipeline: FLUX.1 from the Hub (optionally NF4), a local diffusers folder, or the
packaged Shapes model that runs on any CPU.

NF4 (4-bit NormalFloat with block-wise absmax scales, as in QLoRA) keeps FLUX.1's 12B transformer
near 7 GB. On CUDA it goes through diffusers' and transformers' `BitsAndBytesConfig`, which
quantise while loading; on CPU the loaded transformer's linear layers are swapped for bitsandbytes
`Linear4bit` (bitsandbytes >= 0.45 quantises and multiplies on CPU), which is how the same path is
tested on machines without a GPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from torch import nn

logger = logging.getLogger(__name__)


# What a bad folder or cache raises: OSError from diffusers and huggingface_hub (missing or
# malformed files, offline), SafetensorError from transformers' loader (truncated weights).
_LOAD_ERRORS = (OSError, SafetensorError)

SHAPES = "shapes"
NF4_BLOCKSIZE = 64


class PipelineLoadError(RuntimeError):
    """A pipeline that cannot be loaded, with what to do about it."""


def shapes_model_dir() -> Path:
    """Where the packaged Shapes model lives inside the installed package."""
    return Path(__file__).parent / "shapes" / "model"


TINY = "tiny"
"""Model name of the random tiny pipeline of `fluxsae.tiny` (for trying the app without a model)."""


def generation_defaults(name: str, pipe=None) -> dict:
    """The `pipe(...)` call arguments a model was made for (height, width, steps, T5 length, guidance):
    the Shapes model's `GENERATION_DEFAULTS`, the tiny pipeline's, or FLUX.1-schnell's / -dev's (read
    from `pipe`'s transformer config). A fresh dict each call."""
    if name == TINY:
        from fluxsae.tiny import TINY_GENERATION

        return dict(TINY_GENERATION)
    if name == SHAPES:
        from fluxsae.shapes import GENERATION_DEFAULTS

        return dict(GENERATION_DEFAULTS)
    from fluxsae.flux import flux1_generation

    return flux1_generation(getattr(getattr(pipe, "transformer", None), "config", None))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_source(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder)."""
    if str(name_or_path) == SHAPES:
        folder = shapes_model_dir()
        if not (folder / "model_index.json").is_file():
            raise PipelineLoadError(
                f"The packaged Shapes model is missing from {folder}. It is made by "
                f"`python -m training.shapes_model` (see the README); reinstall fluxsae or train it."
            )
        return str(folder), True
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise PipelineLoadError(
                f"{path} is not a diffusers pipeline folder: it has no model_index.json. Pass the folder "
                f"that `FluxPipeline.save_pretrained` wrote, or a Hub id like "
                f"'black-forest-labs/FLUX.1-schnell'."
            )
        return str(path), True
    if str(name_or_path).count("/") != 1:
        raise PipelineLoadError(
            f"{name_or_path!r} is neither an existing folder nor a Hub id of the form 'owner/name' "
            f"(or 'shapes' for the packaged model)."
        )
    return str(name_or_path), False


def _hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode. It reads HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE)
    once, at import time, so the environment alone can disagree with what it actually does."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return any(
        os.environ.get(var, "0").strip().lower() not in ("0", "", "false", "no", "off")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _unreadable_weights(folder: Path) -> list[str]:
    """The safetensors files under `folder` whose header does not parse or does not cover the file
    (transformers raises a bare `SafetensorError` that names no file)."""
    from safetensors import safe_open

    bad = []
    for f in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # any failure to open means the file is unusable
            bad.append(f"{f} ({e})")
    return bad


def load_pipeline(
    name_or_path: str | os.PathLike = SHAPES,
    quantize: Literal["nf4"] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
):
    """Load a stock `diffusers.FluxPipeline`.

    name_or_path: "shapes" (the packaged Shapes model), a Hub id such as
        "black-forest-labs/FLUX.1-schnell", or a local folder written by `save_pretrained`.
    quantize: None, or "nf4" for 4-bit NormalFloat weights in the transformer (and in T5 on CUDA).
    device: defaults to CUDA when available, else CPU.
    dtype: defaults to bfloat16 on CUDA and float32 on CPU (CPU bf16 matmuls are slow).
    """
    from diffusers import FluxPipeline

    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}.")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    source, local = _resolve_source(name_or_path)
    kwargs = dict(dtype=dtype, revision=revision)  # `torch_dtype` is deprecated in diffusers >= 0.36
    try:
        if quantize == "nf4" and device.type == "cuda":
            pipe = _load_nf4_cuda(source, dtype, kwargs)
        else:
            pipe = FluxPipeline.from_pretrained(source, **kwargs)
    except _LOAD_ERRORS as e:
        if local:
            bad = _unreadable_weights(Path(source))
            which = f" Unreadable weight files (truncated or corrupt): {'; '.join(bad)}." if bad else ""
            reason = str(e).strip().rstrip(".")
            raise PipelineLoadError(f"Could not load the pipeline in {source}: {reason}.{which}") from e
        if not isinstance(e, OSError):
            raise PipelineLoadError(
                f"The cached files of {source!r} are unreadable ({e}); download them again with "
                f"`hf download {source} --force-download`."
            ) from e
        hint = (
            "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so only the local cache is used: download it "
            "first on a machine "
            f"with network (`hf download {source}`) or unset HF_HUB_OFFLINE."
            if _hub_offline()
            else "Check the id and your network, and for gated models (FLUX.1-dev) accept the licence "
            "and log in with `hf auth login`."
        )
        raise PipelineLoadError(f"Could not load {source!r} from the Hugging Face Hub. {hint} ({e})") from e

    if quantize == "nf4" and device.type != "cuda":
        quantize_linear_nf4_(pipe.transformer, compute_dtype=dtype)
    _move(pipe, device)
    pipe.fluxsae_base_model = SHAPES if str(name_or_path) == SHAPES else str(name_or_path)
    pipe.fluxsae_quantization = quantize
    return pipe


def _load_nf4_cuda(source: str, dtype: torch.dtype, kwargs: dict):
    """Quantise transformer and T5 while loading, through bitsandbytes' CUDA kernels."""
    from diffusers import BitsAndBytesConfig as DiffusersBnbConfig
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import BitsAndBytesConfig as TransformersBnbConfig
    from transformers import T5EncoderModel

    nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    transformer = FluxTransformer2DModel.from_pretrained(
        source, subfolder="transformer", quantization_config=DiffusersBnbConfig(**nf4), **kwargs
    )
    text_encoder_2 = T5EncoderModel.from_pretrained(
        source, subfolder="text_encoder_2", quantization_config=TransformersBnbConfig(**nf4), **kwargs
    )
    return FluxPipeline.from_pretrained(
        source, transformer=transformer, text_encoder_2=text_encoder_2, **kwargs
    )


def _is_quantized(module: nn.Module) -> bool:
    return getattr(module, "is_quantized", False) or any(
        type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in module.modules()
    )


def _move(pipe, device: torch.device) -> None:
    """Move each component; bitsandbytes-quantised CUDA components are already placed and cannot move."""
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            if _is_quantized(component) and device.type == "cuda":
                continue
            component.to(device)


def quantize_linear_nf4_(module: nn.Module, compute_dtype: torch.dtype = torch.float32) -> int:
    """Swap every `nn.Linear` inside `module` for an NF4 `bitsandbytes.nn.Linear4bit`, in place.

    Returns the number of layers swapped. Quantisation happens on the CPU as the weights are
    placed; biases stay in `compute_dtype`.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("NF4 needs bitsandbytes: `pip install 'fluxsae[nf4]'`.") from e

    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device="cpu",
            )
            weight = child.weight.detach().to("cpu", torch.float32)
            q.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE
            )
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.detach().to("cpu", compute_dtype), requires_grad=False)
            q = q.to("cpu")  # Params4bit quantises when placed on a device
            setattr(parent, name, q)
            swapped += 1
    if hasattr(module, "config"):
        logger.info("Quantised %d linear layers of %s to NF4", swapped, type(module).__name__)
    return swapped


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by `module`'s parameters and buffers, counting NF4 weights and their scales."""
    total = 0
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total
