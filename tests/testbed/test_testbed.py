"""The trained testbed: data, prompt encoder, identity VAE, metrics, and the shipped weights."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from hybridstitch.errors import HybridStitchError
from hybridstitch.testbed import CLASSIFIER_DIR, LARGE_DIR, SMALL_DIR, WEIGHTS_DIR
from hybridstitch.testbed import data as D
from hybridstitch.testbed import quality as Q
from hybridstitch.testbed.components import IdentityVAE, TestbedPromptEncoder, parse_prompt

torch.set_num_threads(1)

needs_weights = pytest.mark.skipif(
    not os.path.isfile(os.path.join(LARGE_DIR, "transformer", "config.json")),
    reason="testbed weights not trained (python -m hybridstitch.testbed.train)",
)


# -- data ------------------------------------------------------------------------------


def test_split_shapes_ranges_and_labels():
    train, train_labels = D.load_split("train")
    heldout, heldout_labels = D.load_split("heldout")
    assert train.shape == (1500, 1, 32, 32) and heldout.shape == (297, 1, 32, 32)
    assert train.dtype == torch.float32 and train_labels.dtype == torch.int64
    for images in (train, heldout):
        assert images.min() == -1.0 and images.max() == 1.0  # background -1, full ink +1
    assert set(train_labels.tolist()) == set(range(10)) == set(heldout_labels.tolist())


def test_split_is_fixed_disjoint_and_complete():
    train_idx, heldout_idx = D._split_indices()
    assert len(set(train_idx) & set(heldout_idx)) == 0
    assert sorted(np.concatenate([train_idx, heldout_idx]).tolist()) == list(range(1797))
    # A fingerprint of the split: it must not change between runs, machines or versions.
    assert heldout_idx[:8].tolist() == [11, 23, 24, 25, 28, 32, 33, 36]
    assert int(D.load_split("heldout")[1].sum()) == 1352
    a, _ = D.load_split("train")
    a.fill_(0.0)  # callers get copies
    b, _ = D.load_split("train")
    assert b.min() == -1.0


def test_unknown_split_is_refused():
    with pytest.raises(HybridStitchError, match="'train', 'heldout' or 'all'"):
        D.load_split("test")


def test_upsampling_matches_the_8x8_source():
    from sklearn.datasets import load_digits

    images, _ = D.load_split("all")
    # Average-pooling the bilinear 4x upsample recovers the source image to within a
    # fraction of a grey level (bilinear blends neighbouring pixels at block edges).
    pooled = torch.nn.functional.avg_pool2d((images + 1) / 2 * 16, 4)[:, 0]  # [N, 8, 8], 0..16
    source = torch.from_numpy(load_digits().images).float()
    assert (pooled - source).abs().mean() < 1.5


# -- prompt encoder and VAE ------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, label",
    [("a handwritten 3", 3), ("A Handwritten  7 ", 7), ("digit 0", 0), ("9", 9), ("a handwritten digit 5", 5), ("", None), ("   ", None)],
)
def test_parse_prompt(prompt, label):
    assert parse_prompt(prompt) == label


@pytest.mark.parametrize("prompt", ["a cat", "10", "a handwritten 12", "digit", "3 3", "a handwritten three"])
def test_unknown_prompts_are_refused_with_the_accepted_forms(prompt):
    encoder = TestbedPromptEncoder()
    with pytest.raises(HybridStitchError) as err:
        encoder.encode([prompt])
    message = str(err.value)
    assert repr(prompt) in message and "a handwritten N" in message and "null prompt" in message


def test_non_string_prompt_is_refused():
    with pytest.raises(HybridStitchError, match="must be strings"):
        TestbedPromptEncoder().encode([3])


def test_prompt_encoder_shapes_and_round_trip(tmp_path):
    torch.manual_seed(0)
    encoder = TestbedPromptEncoder(num_tokens=8, joint_attention_dim=64, pooled_projection_dim=64)
    embeds, pooled = encoder.encode(["", "a handwritten 3", "3", "digit 4"])
    assert embeds.shape == (4, 8, 64) and pooled.shape == (4, 64)
    torch.testing.assert_close(embeds[1], embeds[2])  # same class, same tokens
    assert not torch.equal(embeds[0], embeds[1]) and not torch.equal(embeds[1], embeds[3])
    single, _ = encoder.encode("a handwritten 3")  # a bare string is one prompt
    torch.testing.assert_close(single[0], embeds[1])
    encoder.save_pretrained(tmp_path / "enc")
    loaded = TestbedPromptEncoder.from_pretrained(tmp_path / "enc")
    for x, y in zip(loaded.encode(["", "a handwritten 3"]), encoder.encode(["", "a handwritten 3"])):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_identity_vae(tmp_path):
    vae = IdentityVAE(latent_channels=1)
    latents = torch.linspace(-3, 3, 16).view(1, 1, 4, 4)
    out = vae.decode(latents).sample
    torch.testing.assert_close(out, latents.clamp(-1, 1))
    torch.testing.assert_close(vae.decode(latents, return_dict=False)[0], out)
    assert vae.dtype == torch.float32 and sum(p.numel() for p in vae.parameters()) == 0
    vae.save_pretrained(tmp_path / "vae")
    assert os.path.isfile(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    loaded = IdentityVAE.from_pretrained(tmp_path / "vae")
    assert loaded.config.scaling_factor == 1.0 and loaded.config.shift_factor == 0.0
    assert 2 ** (len(loaded.config.block_out_channels) - 1) == 1  # SD3's vae_scale_factor


# -- metrics -----------------------------------------------------------------------------


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The usual pytorch-fid formula with scipy's sqrtm of the non-symmetric product."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def test_frechet_distance_identical_sets_is_zero():
    feats = np.random.RandomState(0).randn(200, 16)
    assert Q.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    # Fewer samples than features: singular covariances, still ~0 and finite.
    few = np.random.RandomState(1).randn(10, 64)
    assert Q.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_shift_and_scale_closed_forms():
    x = np.random.RandomState(0).randn(500, 8) @ np.random.RandomState(1).randn(8, 8)
    shift = np.arange(8, dtype=np.float64) / 4
    # Same covariance: FD is the squared mean difference.
    assert Q.frechet_distance(x, x + shift) == pytest.approx(float((shift**2).sum()), rel=1e-9)
    # b = 2x: S_b = 4 S_a, so FD = |mu_a - mu_b|^2 + tr(S_a) + 4 tr(S_a) - 2 tr(2 S_a) = |.|^2 + tr(S_a).
    expected = float((x.mean(0) ** 2).sum() + np.trace(np.cov(x, rowvar=False)))
    assert Q.frechet_distance(x, 2 * x) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_gaussians_matches_the_population_value():
    rng = np.random.RandomState(0)
    n, d = 20000, 4
    std_a, std_b = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.5, 1.0, 0.5, 3.0])
    mu_b = np.array([1.0, 0.0, -1.0, 0.5])
    a = rng.randn(n, d) * std_a
    b = rng.randn(n, d) * std_b + mu_b
    # Diagonal covariances: |mu_a - mu_b|^2 + sum (std_a - std_b)^2.
    expected = float((mu_b**2).sum() + ((std_a - std_b) ** 2).sum())
    assert Q.frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_frechet_distance_matches_the_sqrtm_formula_and_validates_input():
    rng = np.random.RandomState(2)
    a, b = rng.randn(300, 10), rng.randn(250, 10) * 1.3 + 0.2
    assert Q.frechet_distance(a, b) == pytest.approx(_reference_fd(a, b), rel=1e-8)
    assert Q.frechet_distance(torch.from_numpy(a).float(), b) == pytest.approx(_reference_fd(a, b), rel=1e-5)
    with pytest.raises(HybridStitchError, match="feature sizes differ"):
        Q.frechet_distance(a, b[:, :5])
    with pytest.raises(HybridStitchError, match="N >= 2"):
        Q.frechet_distance(a[:1], b)


def test_psnr():
    x = torch.zeros(3, 1, 8, 8)
    assert Q.psnr(x, x) == Q.PSNR_MAX_DB == 100.0
    # MSE 0.01 over a data range of 2: 10 log10(4 / 0.01).
    assert Q.psnr(x + 0.1, x) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-6)  # 0.1 in float32
    with pytest.raises(HybridStitchError, match="equal shapes"):
        Q.psnr(x, x[:2])


@needs_weights
def test_shipped_classifier_accuracy_on_the_heldout_split():
    heldout, labels = D.load_split("heldout")
    assert Q.prompt_accuracy(heldout, labels) > 0.97
    with pytest.raises(HybridStitchError, match="one label per image"):
        Q.prompt_accuracy(heldout, labels[:5])


@needs_weights
def test_feature_distance_and_fd_floor():
    heldout, _ = D.load_split("heldout")
    assert Q.feature_distance(heldout, heldout) == 0.0
    assert Q.feature_distance(heldout[:50], heldout[50:100]) > 1.0
    assert Q.classifier_features(heldout[:4]).shape == (4, 64)
    floor = Q.real_fd_floor(100, seed=0)
    assert floor > 0 and floor == Q.real_fd_floor(100, seed=0)
    assert Q.real_fd_floor(100, seed=1) != floor
    # More than half the data: drawn with replacement from two disjoint halves.
    assert Q.real_fd_floor(1000, seed=0) > 0


# -- shipped weights ---------------------------------------------------------------------


@needs_weights
def test_shipped_folders_load_with_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    large = SD3Transformer2DModel.from_pretrained(os.path.join(LARGE_DIR, "transformer"))
    small = SD3Transformer2DModel.from_pretrained(os.path.join(SMALL_DIR, "transformer"))
    assert large.config.qk_norm == "rms_norm" and small.config.qk_norm is None
    for model in (large, small):
        assert model.config.in_channels == model.config.out_channels == 1
        assert model.config.sample_size == 32 and model.config.patch_size == 2
    encoder = TestbedPromptEncoder.from_pretrained(os.path.join(LARGE_DIR, "prompt_encoder"))
    assert encoder.config.joint_attention_dim == large.config.joint_attention_dim == small.config.joint_attention_dim
    assert encoder.config.pooled_projection_dim == large.config.pooled_projection_dim
    vae = IdentityVAE.from_pretrained(os.path.join(LARGE_DIR, "vae"))
    assert vae.config.latent_channels == 1
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(LARGE_DIR, "scheduler"))
    assert scheduler.config.shift == 3.0

    index = json.load(open(os.path.join(LARGE_DIR, "model_index.json")))
    assert index["_class_name"] == "HybridStitchTestbedPipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["prompt_encoder"] == ["hybridstitch.testbed.components", "TestbedPromptEncoder"]
    assert index["vae"] == ["hybridstitch.testbed.components", "IdentityVAE"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert json.load(open(os.path.join(SMALL_DIR, "model_index.json")))["transformer"] == ["diffusers", "SD3Transformer2DModel"]

    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(WEIGHTS_DIR) for f in fs)
    assert total < 20 * 2**20
    assert os.path.isfile(os.path.join(CLASSIFIER_DIR, "config.json"))


@needs_weights
@pytest.mark.slow
def test_large_beats_small():
    """On a fixed sample the large model is closer to the real digits than the small one."""
    from diffusers import SD3Transformer2DModel

    large = SD3Transformer2DModel.from_pretrained(os.path.join(LARGE_DIR, "transformer")).eval()
    small = SD3Transformer2DModel.from_pretrained(os.path.join(SMALL_DIR, "transformer")).eval()
    encoder = TestbedPromptEncoder.from_pretrained(os.path.join(LARGE_DIR, "prompt_encoder")).eval()
    heldout, _ = D.load_split("heldout")
    labels = torch.arange(10).repeat_interleave(SAMPLES_PER_CLASS)
    metrics = {}
    for name, model in (("large", large), ("small", small)):
        images = Q.sample_euler(model, encoder, labels, steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0))
        assert images.shape == (labels.numel(), 1, 32, 32) and images.abs().max() <= 1.0
        metrics[name] = Q.evaluate_samples(images, labels, heldout)
    assert metrics["large"]["fd"] < FD_MARGIN * metrics["small"]["fd"], metrics
    assert metrics["large"]["accuracy"] > metrics["small"]["accuracy"], metrics


SAMPLES_PER_CLASS = 10
STEPS = 10
GUIDANCE = 1.25
FD_MARGIN = 0.8
