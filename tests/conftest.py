import os
import warnings

import pytest
import torch

# Nothing in the suite may reach the network: the Hub is not reachable from CI either.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")

from fluxsae.tiny import TINY_GENERATION, tiny_flux_pipeline  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_pipe():
    """A fresh tiny random FluxPipeline (function scope: tests may break it on purpose)."""
    return tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="session")
def shared_tiny_pipe():
    """One tiny pipeline for read-only tests; every test using it must leave it as it found it."""
    return tiny_flux_pipeline(seed=0)


def generate(pipe, prompt="a red circle", seed=0, **kwargs):
    """Latents of one generation with the tiny pipeline's arguments, seeded."""
    args = {**TINY_GENERATION, **kwargs}
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=g, output_type=kwargs.pop("output_type", "latent"), **args).images
