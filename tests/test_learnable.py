"""`python -m tuner.tiny FAMILY DIR --learnable`: tiny pipelines whose VAE and text encoders behave like
real ones (models/learnable.py), loaded through the real from_pretrained path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from tuner.config.families import families, family_class

# the families whose learnable VAE is models/learnable_vae.py's AutoencoderKL (another VAE class has its own
# learnable one, tested with its family: Qwen-Image's in tests/test_qwen_image.py)
LATENT = [f for f in families() if family_class(f).components.get("vae") == "diffusers.AutoencoderKL"]
PROMPTS = ["top left square", "top right square", "bottom left square", "bottom right square"]


@pytest.fixture(scope="session")
def learnable_dir(tmp_path_factory):
    """Learnable tiny pipelines, written on demand once per session."""
    from tuner.config.families import write_tiny

    root = tmp_path_factory.mktemp("learnable")
    return lambda family: write_tiny(family, root / family, learnable=True)


@pytest.mark.parametrize("family", LATENT)
def test_the_vae_is_nearly_deterministic_unit_variance_and_invertible(family, learnable_dir):
    from diffusers import AutoencoderKL

    from models.learnable import toy_images

    path = learnable_dir(family)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    images = toy_images(32, 64, torch.Generator().manual_seed(123))  # other images than the factors were set on
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        latents = (posterior.mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        decoded = vae.decode(posterior.mean).sample
    # the posterior's noise is tiny against the spread of its means (a random tiny VAE: ~1.0 against ~0.2)
    assert float(posterior.std.max()) * vae.config.scaling_factor < 0.01
    assert abs(float(latents.mean())) < 0.15 and 0.8 < float(latents.std()) < 1.25
    # the decoder inverts the encoder: each 8x8 block's colour comes back
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 8), scale_factor=8)
    assert float((decoded - blocks).abs().max()) < 0.02
    assert float((decoded - images).pow(2).mean()) < 0.25 * float(images.var())
    measured = json.loads((path / "learnable.json").read_text())
    assert measured["posterior_std"] < 1e-2 and abs(measured["latent_std"] - 1) < 1e-3
    # the family's own latent width, shift and quant convs, as its real VAE has them
    plain = family_class(family).tiny_pipeline(family).vae.config
    assert vae.config.latent_channels == plain.latent_channels
    assert (vae.config.shift_factor is None) == (plain.shift_factor is None)
    assert vae.config.use_quant_conv == plain.use_quant_conv


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_text_encoders_tell_the_class_prompts_apart(family, learnable_dir):
    from diffusers import DiffusionPipeline

    from models.learnable import prompt_spread

    pipe = DiffusionPipeline.from_pretrained(learnable_dir(family))
    assert prompt_spread(pipe, PROMPTS) > 0.25
    plain = family_class(family).tiny_pipeline(family)
    assert prompt_spread(pipe, PROMPTS) > 1.5 * prompt_spread(plain, PROMPTS)  # sharper than the random one


def test_the_cli_writes_a_learnable_pipeline_and_leaves_the_plain_one_alone(demo_dir, tmp_path):
    proc = run_cli("-m", "tuner.tiny", "sd15", str(tmp_path / "l"), "--learnable")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "l" / "learnable.json").is_file() and (tmp_path / "l" / "model_index.json").is_file()
    assert not (demo_dir / "sd15" / "learnable.json").exists()  # the plain pipeline (written without the flag)
    plain = json.loads((demo_dir / "sd15" / "vae" / "config.json").read_text())
    learnable = json.loads((tmp_path / "l" / "vae" / "config.json").read_text())
    assert plain["scaling_factor"] == 0.18215 and learnable["scaling_factor"] != plain["scaling_factor"]


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart_sigma"])
def test_a_transformer_is_twice_as_wide_as_its_patch_and_trains(family, learnable_dir, make_cfg, tmp_path):
    """Flow matching returns the noise through the denoiser, past a LayerNorm a token: one with no spare
    width cannot."""
    import numpy as np

    from models.learnable import WIDTH_OVER_PATCH
    from tuner.run import train

    path = learnable_dir(family)
    config = json.loads((path / "transformer" / "config.json").read_text())
    width = config["num_attention_heads"] * config["attention_head_dim"]
    assert width >= WIDTH_OVER_PATCH * config["in_channels"] * config.get("patch_size", 1) ** 2
    for key in ("caption_projection_dim", "cross_attention_dim"):  # the widths the config repeats follow it
        assert config.get(key) in (None, width)
    loss = train(
        make_cfg(
            f"model={family}",
            f"model.pretrained_model_name_or_path={path}",
            "max_train_steps=2",
            "callbacks.validation.enabled=false",
            output_dir=tmp_path / "out",
        )
    )
    assert loss is not None and np.isfinite(loss)


def _position_gap(transformer) -> float:
    """The smallest distance between two tokens' position codes of an 8x8 latent, over the codes' size."""
    embed = transformer.pos_embed
    with torch.no_grad():
        zeros = torch.zeros(1, transformer.config.in_channels, 8, 8)
        codes = (embed(zeros) - embed.proj(zeros).flatten(2).transpose(1, 2))[0]  # the position part only
    gaps = torch.cdist(codes, codes) + torch.eye(len(codes)) * 1e9
    return float(gaps.min() / codes.norm(dim=1).mean())


def test_sd3s_position_code_tells_tokens_apart(learnable_dir):
    """A tiny width keeps few of the code's frequencies, and SD3's tiny config spaces its tokens 1/8 apart:
    the plain tiny transformer gives every token nearly the same code, so no square can be put in a
    quadrant. The learnable one's codes differ, stored with its weights and loaded by from_pretrained."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(learnable_dir("sd3"))
    assert _position_gap(family_class("sd3").tiny_pipeline("sd3").transformer) < 0.1  # measured: 0.03
    assert _position_gap(pipe.transformer) > 0.3  # measured: 0.58


def test_pixarts_position_code_is_spaced_in_its_config(learnable_dir):
    """PixArt computes its code from its config; the changed spacing must survive save and from_pretrained
    (diffusers' list of keys left at their defaults once reset it to None)."""
    from diffusers import PixArtTransformer2DModel

    from models.learnable import POSITION_SPACING

    transformer = PixArtTransformer2DModel.from_pretrained(learnable_dir("pixart_sigma"), subfolder="transformer")
    assert transformer.pos_embed.interpolation_scale == pytest.approx(1 / POSITION_SPACING)


def test_kolors_chatglm_summarises_the_prompt_in_its_pooled_vector(learnable_dir):
    """Kolors' pooled vector is ChatGLM's last token. The random tiny encoder's was ~0.003 a number apart
    between class prompts (each ends in "square", every state is at the embeddings' 0.02 scale, and its
    attention hardly mixes the tokens), so the UNet's global text signal carried nothing."""
    from diffusers import KolorsPipeline

    def pooled_gap(pipe) -> float:  # the smallest RMS difference a number between two class prompts
        with torch.no_grad():
            _, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        gaps = torch.cdist(pooled, pooled) / pooled.shape[1] ** 0.5
        return float(gaps[~torch.eye(len(PROMPTS), dtype=torch.bool)].min())

    assert pooled_gap(family_class("kolors").tiny_pipeline("kolors")) < 0.01
    assert pooled_gap(KolorsPipeline.from_pretrained(learnable_dir("kolors"))) > 0.1


def _decoder_lm(kind: str):
    """A tiny random decoder-only LM text encoder (two layers, Qwen's byte-level vocabulary)."""
    import transformers

    config = {"Qwen3Model": transformers.Qwen3Config, "LlamaForCausalLM": transformers.LlamaConfig}[kind]
    torch.manual_seed(0)
    return getattr(transformers, kind)(config(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8))


@pytest.mark.parametrize("kind", ["Qwen3Model", "LlamaForCausalLM"])
def test_a_decoder_lm_text_encoder_carries_the_prompt_into_its_late_tokens(kind):
    """Qwen3 (Z-Image, FLUX.2 [klein]), Qwen2.5-VL (Qwen-Image), Llama (HiDream) and Mistral (FLUX.2 [dev]) are
    random tiny LMs of ChatGLM's make: their 0.02-scale embeddings and projections leave each token mostly its own
    word, so the tokens after the words that differ (the chat template's tail) hardly differ between prompts."""
    from types import SimpleNamespace

    from models.learnable import sharpen_text_encoders
    from models.tiny import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    texts = [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in PROMPTS]

    def last_token_gap(encoder) -> float:  # smallest RMS distance between prompts' last states, each RMS-normalised
        tokens = tokenizer(texts, padding="max_length", max_length=48, return_tensors="pt")
        with torch.no_grad():
            states = encoder(**tokens, output_hidden_states=True).hidden_states[-2]  # the layer Z-Image takes
        last = states[torch.arange(len(texts)), tokens.attention_mask.sum(1) - 1]
        last = last / last.pow(2).mean(-1, keepdim=True).sqrt()
        gaps = torch.cdist(last, last) / last.shape[1] ** 0.5
        return float(gaps[~torch.eye(len(texts), dtype=torch.bool)].min())

    plain, sharp = _decoder_lm(kind), _decoder_lm(kind)
    sharpen_text_encoders(SimpleNamespace(components={"text_encoder": sharp}))
    assert last_token_gap(sharp) > 2 * last_token_gap(plain)


def _moving_square_and_noise(frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Two clips (2, 3, frames, size, size) in [-1, 1]: a square moving 4 px a frame over a plain background,
    and frames of uniform noise."""
    square = torch.empty(3, frames, size, size)
    square[:] = torch.tensor([-0.6, 0.2, 0.5]).view(3, 1, 1, 1)
    for f in range(frames):
        square[:, f, 10:26, 4 + 4 * f : 20 + 4 * f] = torch.tensor([0.9, -0.8, 0.1]).view(3, 1, 1)
    noise = torch.rand(3, frames, size, size, generator=generator) * 2 - 1
    return torch.stack([square, noise])


@torch.no_grad()
def test_the_learnable_wan_vae_packs_each_group_of_4_frames_into_one_latent_frame():
    """Wan 2.1's layout: frame 0 alone, then 4 frames a latent frame. Latent frame 0 is frame 0's as an image
    (exactly, as before the temporal weights were set), later ones the map of their group's mean frame; each
    later latent frame decodes to 4 copies of its image."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKLWan

    from models.learnable import toy_images
    from models.learnable_vae_qwen import WIDTH, learnable_qwen_vae
    from models.learnable_vae_wan import make_wan_vae

    vae, _ = make_wan_vae(SimpleNamespace(is_residual=False, z_dim=16))
    clip = _moving_square_and_noise(9, 64, torch.Generator().manual_seed(5))

    def encode(x):
        return vae.encode(x).latent_dist.mean

    latents = encode(clip)
    assert latents.shape == (2, 16, 3, 8, 8)
    # one frame as the one-frame VAE (temporal convolutions zero) encodes it, bit for bit, but for the border marker,
    # which its decoder does not read
    one_frame = AutoencoderKLWan(base_dim=WIDTH, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    one_frame.load_state_dict(learnable_qwen_vae(0).state_dict())
    first = one_frame.encode(clip[:, :, :1]).latent_dist.mean
    assert torch.equal(encode(clip[:, :, :1]), latents[:, :, :1])
    inside = (slice(None), slice(None), slice(0, 1), slice(1, -1), slice(1, -1))  # the marker cancels to rounding
    torch.testing.assert_close(latents[inside], first[inside], rtol=0, atol=1e-5)
    torch.testing.assert_close(vae.decode(latents[:, :, :1]).sample, one_frame.decode(first).sample, rtol=0, atol=1e-5)
    for j in (1, 2):
        group = clip[:, :, 4 * j - 3 : 4 * j + 1].mean(dim=2, keepdim=True)
        torch.testing.assert_close(latents[:, :, j : j + 1], encode(group), rtol=0, atol=1e-4)
    assert float((latents[:, :, 1] - latents[:, :, 2]).abs().max()) > 0.1  # the groups differ

    decoded = vae.decode(latents).sample
    assert decoded.shape == (2, 3, 9, 64, 64)
    torch.testing.assert_close(decoded[:, :, :1], vae.decode(latents[:, :, :1]).sample, rtol=0, atol=1e-5)
    for j in (1, 2):
        alone = vae.decode(latents[:, :, j : j + 1]).sample
        for f in range(4 * j - 3, 4 * j + 1):
            torch.testing.assert_close(decoded[:, :, f : f + 1], alone, rtol=0, atol=1e-5)

    # 8x8-block-constant frames, each group of 4 one frame, come back
    images = toy_images(6, 64, torch.Generator().manual_seed(11))
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 8), scale_factor=8)
    blocky = blocks.view(2, 3, 3, 64, 64).transpose(1, 2)  # (2, 3, 3 groups, 64, 64)
    blocky = torch.cat([blocky[:, :, :1], blocky[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
    assert float((vae.decode(encode(blocky)).sample - blocky).abs().max()) < 0.02


def test_the_learnable_wan_vaes_latents_mark_the_border_as_a_real_vaes_do():
    """A flat image's latents are the same everywhere but at the border (where a real VAE's zero padding shows), by
    about a channel's spread, along a direction the decoder does not read: it still decodes the flat image."""
    from types import SimpleNamespace

    from models.learnable_vae_wan import make_wan_vae

    vae, _ = make_wan_vae(SimpleNamespace(is_residual=False, z_dim=16))
    flat = torch.tensor([-0.3, -0.2, 0.1]).view(1, 3, 1, 1, 1).expand(1, 3, 1, 64, 64)
    z = vae.encode(flat).latent_dist.mean
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    apart = ((z - z[..., 4:5, 4:5]) / std).pow(2).sum(1)[0, 0]  # (8, 8): squared distance from the middle
    assert float(apart[1:-1, 1:-1].max()) < 1e-6
    assert 0.5 < float(apart[0, 3]) < 3 and 0.5 < float(apart[3, -1]) < 3 and float(apart[0, 0]) > float(apart[0, 3])
    assert float((vae.decode(z).sample - flat).abs().max()) < 1e-4


@torch.no_grad()
def test_the_learnable_wan22_vae_is_wan22s_layout_a_16x16_box_filter_4_frames_a_latent_frame():
    """TI2V-5B's VAE (residual, 2x2 patch, 48 channels at 1/16, 4x in time), learnable: unit-variance latents, frame 0
    alone and then each group of 4 frames' mean, decoded back to 16x16 blocks; the border marked as Wan 2.1's."""
    from models.learnable import toy_images
    from models.learnable_vae_wan import make_wan_vae
    from models.wan import WanModule

    config = WanModule.tiny_pipeline("wan22-ti2v").vae.config
    vae, measured = make_wan_vae(config)
    assert (vae.config.is_residual, vae.config.z_dim, vae.config.patch_size, vae.config.scale_factor_spatial) == (
        True, 48, 2, 16)
    assert measured["posterior_std_over_latent_std"] < 0.01 and 0.95 < measured["latent_std"] < 1.05
    assert measured["reconstruction_mse_vs_blocks"] < 1e-6

    clip = _moving_square_and_noise(9, 64, torch.Generator().manual_seed(5))
    latents = vae.encode(clip).latent_dist.mean
    assert latents.shape == (2, 48, 3, 4, 4)
    torch.testing.assert_close(latents[:, :, :1], vae.encode(clip[:, :, :1]).latent_dist.mean, rtol=0, atol=1e-5)
    for j in (1, 2):
        group = clip[:, :, 4 * j - 3 : 4 * j + 1].mean(dim=2, keepdim=True)
        torch.testing.assert_close(latents[:, :, j : j + 1], vae.encode(group).latent_dist.mean, rtol=0, atol=1e-4)
    assert float((latents[:, :, 1] - latents[:, :, 2]).abs().max()) > 0.1

    images = toy_images(6, 64, torch.Generator().manual_seed(11))
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 16), scale_factor=16)
    blocky = blocks.view(2, 3, 3, 64, 64).transpose(1, 2)
    blocky = torch.cat([blocky[:, :, :1], blocky[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
    assert float((vae.decode(vae.encode(blocky).latent_dist.mean).sample - blocky).abs().max()) < 1e-4

    flat = torch.tensor([-0.3, -0.2, 0.1]).view(1, 3, 1, 1, 1).expand(1, 3, 1, 128, 128)
    z = vae.encode(flat).latent_dist.mean
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    apart = ((z - z[..., 4:5, 4:5]) / std).pow(2).sum(1)[0, 0]  # (8, 8)
    assert float(apart[1:-1, 1:-1].max()) < 1e-6 and 0.5 < float(apart[0, 3]) < 3
    assert float((vae.decode(z).sample - flat).abs().max()) < 1e-4


@pytest.mark.parametrize("variant", ["wan22-a14b", "wan22-ti2v"])
def test_the_wan22_variants_have_learnable_pipelines(variant, tmp_path):
    """``python -m tuner.tiny <variant> --learnable``: A14B's two experts are both widened (each its own draw); TI2V
    gets the learnable 48-channel residual VAE and a transformer widened for its 48 x 2 x 2 patch."""
    import diffusers

    from models.learnable import toy_images
    from tuner.config.families import write_tiny

    pipe = diffusers.WanPipeline.from_pretrained(write_tiny(variant, tmp_path / variant, learnable=True))
    experts = [pipe.transformer] + ([pipe.transformer_2] if variant == "wan22-a14b" else [])
    patch = pipe.transformer.config.in_channels * 4
    for expert in experts:
        width = expert.config.num_attention_heads * expert.config.attention_head_dim
        assert width >= 2 * patch
    if variant == "wan22-a14b":
        assert not torch.equal(pipe.transformer.proj_out.weight, pipe.transformer_2.proj_out.weight)
        assert pipe.config.boundary_ratio == 0.875
    else:
        assert pipe.vae.config.is_residual and pipe.vae.config.z_dim == 48 and patch == 192
    images = toy_images(4, 64, torch.Generator().manual_seed(2))[:, :, None]
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert 0.6 < float(((latents - mean) / std).std()) < 1.4
