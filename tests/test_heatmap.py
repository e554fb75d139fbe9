import numpy as np
import pytest
import torch
from PIL import Image

from fluxsae.heatmap import activation_norms, colorize, overlay, token_grid, token_map
from fluxsae.tiny import TINY_GENERATION


def test_token_grid_of_the_tiny_pipeline_matches_its_image_tokens(shared_tiny_pipe):
    import fluxsae

    h, w = TINY_GENERATION["height"], TINY_GENERATION["width"]
    assert token_grid(shared_tiny_pipe, h, w) == (4, 4)
    g = torch.Generator().manual_seed(0)
    with fluxsae.capture(shared_tiny_pipe, ["transformer_blocks.0.image"], steps=[0]) as acts:
        shared_tiny_pipe(
            "a red circle", generator=g, output_type="latent", **{**TINY_GENERATION, "num_inference_steps": 1}
        )
    assert acts["transformer_blocks.0.image"].shape[2] == 4 * 4


def test_token_grid_arithmetic_for_flux1_and_non_square_images(shared_tiny_pipe):
    class Flux1Geometry:  # FLUX.1's VAE down-samples x8
        vae_scale_factor = 8

    assert token_grid(Flux1Geometry(), 256, 256) == (16, 16)
    assert token_grid(Flux1Geometry(), 1024, 768) == (64, 48)
    assert token_grid(shared_tiny_pipe, 64, 32) == (8, 4)  # rows follow the height
    with pytest.raises(ValueError, match="multiples of 8"):
        token_grid(shared_tiny_pipe, 36, 32)


def test_token_map_is_row_major_and_checks_the_count():
    m = token_map(torch.arange(12.0), (3, 4))
    assert m[1, 2] == 1 * 4 + 2
    with pytest.raises(ValueError, match="needs 12 values"):
        token_map(torch.arange(16.0), (3, 4))


def test_activation_norms_picks_step_and_batch():
    acts = torch.zeros(3, 2, 5, 4)
    acts[2, 1, 3] = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert activation_norms(acts, step=-1, batch=1).tolist() == [0, 0, 0, 5, 0]
    assert activation_norms(acts).abs().sum() == 0
    with pytest.raises(ValueError, match="steps, batch, tokens, d"):
        activation_norms(acts[0])


def test_overlay_paints_the_hot_token_as_a_crisp_square():
    rng = np.random.default_rng(0)
    # A dark image: inferno's cold end is black, so only the hot (bright) token stands out.
    image = Image.fromarray(rng.integers(0, 40, (64, 64, 3), dtype=np.uint8))
    grid = torch.zeros(4, 4)
    grid[1, 2] = 1.0  # row 1, col 2 -> pixels y 16-31, x 32-47
    out = overlay(image, grid, alpha=0.55)
    assert out.size == image.size and out.mode == "RGB"

    diff = np.abs(np.asarray(out, dtype=float) - np.asarray(image, dtype=float)).sum(-1)
    per_token = diff.reshape(4, 16, 4, 16).mean(axis=(1, 3))
    assert np.unravel_index(per_token.argmax(), per_token.shape) == (1, 2)

    # Against the all-cold map, exactly the 16x16 px square of the hot token changed.
    changed = (np.asarray(out) != np.asarray(overlay(image, torch.zeros(4, 4)))).any(-1)
    expected = np.zeros((64, 64), bool)
    expected[16:32, 32:48] = True
    assert (changed == expected).all()

    heat = np.asarray(colorize(grid, size=(64, 64)))
    square = heat[16:32, 32:48]
    assert (square == square[0, 0]).all()  # NEAREST: one colour per token, edges included
    assert (heat[15, 32:48] != square[0, 0]).any() and (heat[16:32, 31] != square[0, 0]).any()


def test_constant_map_works_and_nan_is_refused():
    image = Image.new("RGB", (32, 32), (10, 20, 30))
    out = overlay(image, torch.full((4, 4), 7.0))
    assert len({tuple(p) for p in np.asarray(out).reshape(-1, 3)}) == 1  # uniform, no NaN colours
    bad = torch.zeros(4, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        overlay(image, bad)


def test_vmin_vmax_fix_the_colour_scale():
    a = np.asarray(colorize(torch.tensor([[0.0, 1.0]]), vmin=0, vmax=10))
    b = np.asarray(colorize(torch.tensor([[0.0, 10.0]]), vmin=0, vmax=10))
    assert (a[0, 0] == b[0, 0]).all() and (a[0, 1] != b[0, 1]).any()
