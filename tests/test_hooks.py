"""capture / edit_site / add_to_site on a real (tiny, random) diffusers FluxPipeline."""

import pytest
import torch
from conftest import generate

from fluxsae import add_to_site, capture, edit_site
from fluxsae.tiny import TINY_GENERATION, tiny_flux_pipeline

IMG = "transformer_blocks.1.image"
TXT = "single_transformer_blocks.0.text"
N_IMG, N_TXT, D = 16, TINY_GENERATION["max_sequence_length"], 32


def test_capture_shapes_and_step_metadata(tiny_pipe):
    with capture(tiny_pipe, [IMG, TXT]) as acts:
        generate(tiny_pipe)
    assert acts[IMG].shape == (4, 1, N_IMG, D)
    assert acts[TXT].shape == (4, 1, N_TXT, D)
    assert acts.steps == [0, 1, 2, 3]
    sig = acts.sigmas
    assert sig[0] == pytest.approx(1.0) and torch.all(sig[1:] < sig[:-1])
    assert set(acts) == {IMG, TXT}


def test_streams_are_picked_by_name(tiny_pipe):
    """The image stream after the last double block is exactly what the first single block receives."""
    seen = []
    block = tiny_pipe.transformer.single_transformer_blocks[0]
    h = block.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].clone(), kw["encoder_hidden_states"].clone())),
        with_kwargs=True,
    )
    try:
        with capture(tiny_pipe, [IMG, "transformer_blocks.1.text"]) as acts:
            generate(tiny_pipe)
    finally:
        h.remove()
    for step, (img, txt) in enumerate(seen):
        assert torch.equal(acts[IMG][step, 0], img[0])
        assert torch.equal(acts["transformer_blocks.1.text"][step, 0], txt[0])


def test_step_selection_matches_full_capture(tiny_pipe):
    with capture(tiny_pipe, IMG) as full:
        generate(tiny_pipe)
    with capture(tiny_pipe, IMG, steps=[0, 2]) as some:
        generate(tiny_pipe)
    assert some.steps == [0, 2]
    assert torch.equal(some[IMG], full[IMG][[0, 2]])
    with capture(tiny_pipe, IMG, steps=range(10, 12)) as none:
        generate(tiny_pipe)
    with pytest.raises(KeyError, match="none of its steps matched"):
        none[IMG]
    with pytest.raises(ValueError, match="negative"):
        with capture(tiny_pipe, IMG, steps=[-1]):
            pass


def test_batches_and_images_per_prompt(tiny_pipe):
    """Rows are prompt-major: row i is prompt i // 2 on the i-th noise, as if generated alone."""
    prompts = ["a red circle", "a blue square"]
    latents = torch.randn(4, N_IMG, tiny_pipe.transformer.config.in_channels,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    with capture(tiny_pipe, IMG) as acts:
        generate(tiny_pipe, prompt=prompts, num_images_per_prompt=2, latents=latents)
    assert acts[IMG].shape == (4, 4, N_IMG, D)
    for i in range(4):
        with capture(tiny_pipe, IMG) as alone:
            generate(tiny_pipe, prompt=prompts[i // 2], latents=latents[i : i + 1])
        torch.testing.assert_close(acts[IMG][:, i], alone[IMG][:, 0], rtol=1e-4, atol=1e-5)
    # The images of one prompt differ by their noise, so the comparison above can tell rows apart.
    assert not torch.allclose(acts[IMG][:, 0], acts[IMG][:, 1], atol=1e-2)


def test_two_generations_in_one_block_concatenate_along_batch(tiny_pipe):
    with capture(tiny_pipe, IMG) as acts:
        generate(tiny_pipe, seed=0)
        generate(tiny_pipe, seed=1)
    with capture(tiny_pipe, IMG) as one:
        generate(tiny_pipe, seed=1)
    assert acts.n_generations == 2 and acts[IMG].shape == (4, 2, N_IMG, D)
    assert torch.equal(acts[IMG][:, 1], one[IMG][:, 0])


def test_single_step_generations_are_not_mistaken_for_cfg(tiny_pipe):
    with capture(tiny_pipe, IMG) as acts:
        generate(tiny_pipe, seed=0, num_inference_steps=1)
        generate(tiny_pipe, seed=1, num_inference_steps=1)
    assert acts[IMG].shape == (1, 2, N_IMG, D)


def test_true_cfg_records_the_chosen_pass(tiny_pipe):
    """At step 0 the latents are the same, so the cond pass of a CFG run equals a plain run on the
    prompt, and the uncond pass a plain run on the negative prompt."""
    cfg = dict(true_cfg_scale=3.0, negative_prompt="a blue square")
    with capture(tiny_pipe, IMG, steps=[0]) as cond:
        generate(tiny_pipe, **cfg)
    with capture(tiny_pipe, IMG, steps=[0], cfg_pass="uncond") as uncond:
        generate(tiny_pipe, **cfg)
    with capture(tiny_pipe, IMG, steps=[0]) as plain_pos:
        generate(tiny_pipe, prompt="a red circle")
    with capture(tiny_pipe, IMG, steps=[0]) as plain_neg:
        generate(tiny_pipe, prompt="a blue square")
    assert torch.equal(cond[IMG], plain_pos[IMG])
    assert torch.equal(uncond[IMG], plain_neg[IMG])
    assert uncond.cfg_pass == "uncond"
    with capture(tiny_pipe, IMG, cfg_pass="uncond") as all_steps:
        generate(tiny_pipe, **cfg)
    assert all_steps.steps == [0, 1, 2, 3]


def test_capture_under_model_cpu_offload():
    pipe = tiny_flux_pipeline()
    with capture(pipe, IMG) as plain:
        clean = generate(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    with capture(pipe, IMG) as offloaded:
        out = generate(pipe)
    assert torch.allclose(offloaded[IMG], plain[IMG], atol=1e-6)
    assert torch.allclose(out, clean, atol=1e-6)
    # Not a constant vector: the next block's LayerNorm would remove a uniform shift entirely.
    with add_to_site(pipe, IMG, torch.randn(D, generator=torch.Generator().manual_seed(0)), strength=1.0):
        steered = generate(pipe)
    assert not torch.allclose(steered, clean, atol=1e-3)


def test_storage_dtype(tiny_pipe):
    with capture(tiny_pipe, IMG, dtype=torch.bfloat16) as acts:
        generate(tiny_pipe)
    assert acts[IMG].dtype == torch.bfloat16 and acts[IMG].device.type == "cpu"


def test_recorded_values_are_copies_that_later_in_place_changes_do_not_reach(tiny_pipe):
    """What capture keeps is a copy: a later hook that overwrites the block's output in place (a single
    block's image stream is a view into its joint sequence) leaves the recording as the block made it."""
    sites = ["single_transformer_blocks.1.image", "single_transformer_blocks.1.text"]  # the last block
    with capture(tiny_pipe, sites) as reference:
        generate(tiny_pipe)

    def zero(module, args, kwargs, output):
        for t in output:
            t.mul_(0)

    with capture(tiny_pipe, sites) as acts:  # capture's hook runs first: it was registered first
        handle = tiny_pipe.transformer.single_transformer_blocks[1].register_forward_hook(
            zero, with_kwargs=True
        )
        try:
            generate(tiny_pipe)
        finally:
            handle.remove()
        inside = acts[sites[0]].clone()  # readable inside the block too
    for site in sites:
        assert acts[site][0].abs().sum() > 0
        # step 0 of the last block: recorded before the zeroing changed anything
        assert torch.equal(acts[site][0], reference[site][0])
        assert not torch.equal(acts[site][1], reference[site][1])  # the zeroing did change the generation
    assert torch.equal(inside, acts[sites[0]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned, non-blocking path runs on CUDA only")
def test_cuda_sites_are_copied_into_pinned_memory_bit_identically():
    pipe = tiny_flux_pipeline(seed=0).to("cuda")
    sites = [IMG, TXT, "single_transformer_blocks.1.image"]
    for dtype in (None, torch.bfloat16):
        with capture(pipe, sites, dtype=dtype) as to_cpu:
            generate(pipe)
        with capture(pipe, sites, device=None, dtype=dtype) as on_gpu:
            generate(pipe)
        stored = [t for steps in to_cpu._data.values() for t in steps.values()]
        assert stored and all(t.device.type == "cpu" and t.is_pinned() for t in stored)
        for site in sites:
            assert on_gpu[site].device.type == "cuda"
            assert torch.equal(to_cpu[site], on_gpu[site].cpu())
        assert torch.equal(to_cpu.sigmas, on_gpu.sigmas)


def test_bad_sites_fail_before_generation(tiny_pipe):
    with pytest.raises(ValueError, match="valid indices 0-1"):
        with capture(tiny_pipe, ["transformer_blocks.5.image"]):
            pass
    with pytest.raises(ValueError, match="at least one site"):
        with capture(tiny_pipe, []):
            pass
    with pytest.raises(ValueError, match="'cond' or 'uncond'"):
        with capture(tiny_pipe, IMG, cfg_pass="both"):
            pass


def test_strength_zero_is_bit_exact_noop(tiny_pipe):
    clean = generate(tiny_pipe)
    with add_to_site(tiny_pipe, IMG, torch.randn(D), strength=0.0):
        same = generate(tiny_pipe)
    assert torch.equal(same, clean)
    with add_to_site(tiny_pipe, IMG, torch.randn(D), strength=0.5):
        steered = generate(tiny_pipe)
    assert not torch.allclose(steered, clean, atol=1e-4)


def test_addition_lands_on_chosen_tokens_and_steps(tiny_pipe):
    v = torch.randn(D)
    region = torch.zeros(N_IMG, dtype=torch.bool)
    region[[5, 6, 9, 10]] = True  # the central 2x2 of the 4x4 token grid
    with capture(tiny_pipe, IMG) as clean:
        generate(tiny_pipe)
    # Hooks run in the order they were registered, so in one generation `before` sees the block's
    # own output and `after` the edited one, on every step with the same input.
    with capture(tiny_pipe, IMG) as before:
        with add_to_site(tiny_pipe, IMG, v, strength=2.0, steps=[0, 2], tokens=region):
            with capture(tiny_pipe, IMG) as after:
                generate(tiny_pipe)
    delta = (after[IMG] - before[IMG])[:, 0]  # [steps, tokens, d]
    for step in (0, 2):
        torch.testing.assert_close(delta[step][region], (2.0 * v).expand(4, D), rtol=0, atol=1e-5)
        assert torch.equal(delta[step][~region], torch.zeros(N_IMG - 4, D))
    for step in (1, 3):
        assert torch.equal(delta[step], torch.zeros(N_IMG, D))
    # Step 0 starts from the same latents as a clean generation: the edit is the only difference.
    torch.testing.assert_close(before[IMG][0], clean[IMG][0], rtol=0, atol=0)
    # Later steps start from the edited latents: the rest of the generation does see the edit.
    assert not torch.allclose(before[IMG][1], clean[IMG][1], atol=1e-4)


def test_token_indices_and_bad_regions(tiny_pipe):
    with add_to_site(tiny_pipe, IMG, torch.ones(D), tokens=[0, 1], steps=[0]):
        with capture(tiny_pipe, IMG, steps=[0]) as acts:
            generate(tiny_pipe)
    with capture(tiny_pipe, IMG, steps=[0]) as clean:
        generate(tiny_pipe)
    changed = (acts[IMG] != clean[IMG]).any(-1)[0, 0]
    assert changed.nonzero().flatten().tolist() == [0, 1]
    with pytest.raises(ValueError, match="16 entries"):
        with add_to_site(tiny_pipe, IMG, torch.ones(D), tokens=torch.ones(5, dtype=torch.bool)):
            generate(tiny_pipe)
    with pytest.raises(ValueError, match="0-15"):
        with add_to_site(tiny_pipe, IMG, torch.ones(D), tokens=[99]):
            generate(tiny_pipe)
    with pytest.raises(ValueError, match="width 32"):
        with add_to_site(tiny_pipe, IMG, torch.ones(7)):
            generate(tiny_pipe)
    with pytest.raises(ValueError, match="NaN"):
        with add_to_site(tiny_pipe, IMG, torch.full((D,), float("nan"))):
            pass


class Boom(RuntimeError):
    pass


def _explode_at_step_1(pipe, step, timestep, kwargs):
    if step == 1:
        raise Boom("interrupted mid-generation")
    return kwargs


def test_exception_mid_generation_leaves_pipeline_untouched(tiny_pipe):
    fresh = generate(tiny_flux_pipeline(seed=0))
    with pytest.raises(Boom):
        with add_to_site(tiny_pipe, IMG, torch.ones(D), strength=3.0):
            with capture(tiny_pipe, [IMG, TXT]):
                generate(tiny_pipe, callback_on_step_end=_explode_at_step_1)
    # A failing edit function is an exception raised inside a hook.
    with pytest.raises(ValueError, match="must keep the shape"):
        with edit_site(tiny_pipe, TXT, lambda h, step: h[:, :1]):
            generate(tiny_pipe)
    assert torch.equal(generate(tiny_pipe), fresh)
    for block in [
        *tiny_pipe.transformer.transformer_blocks,
        *tiny_pipe.transformer.single_transformer_blocks,
    ]:
        assert not block._forward_hooks and not block._forward_pre_hooks
    assert not tiny_pipe.transformer._forward_pre_hooks


def test_edit_site_replaces_the_stream(tiny_pipe):
    """Zeroing the text stream after the last single block cannot change the image (text tokens
    are dropped there), while zeroing the image stream must."""
    clean = generate(tiny_pipe)
    with edit_site(tiny_pipe, "single_transformer_blocks.1.text", lambda h, step: torch.zeros_like(h)):
        assert torch.equal(generate(tiny_pipe), clean)
    with edit_site(
        tiny_pipe, "single_transformer_blocks.1.image", lambda h, step: torch.zeros_like(h), steps=[3]
    ):
        assert not torch.equal(generate(tiny_pipe), clean)
