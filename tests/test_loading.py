"""Checkpoints as SD3.5 users hold them (issue 15): single .safetensors files (SAI's original keys
or diffusers', fp8 included), Hugging Face cache entries, bf16 by default where it belongs, and the
text encoders placed, dropped or passed in -- all loaded by diffusers' own loaders, from local disk
only, on tiny checkpoints written the way users have them (tests/checkpoint_files.py)."""

import os
import shutil
import socket

import numpy as np
import pytest
import torch

from hybridstitch import HybridStitchError, HybridStitchPipeline
from hybridstitch.checkpoints import resolve_checkpoint
from hybridstitch.loading import default_torch_dtype, load_transformer, parse_device
from hybridstitch.testbed import LARGE_DIR, SMALL_DIR
from tests.checkpoint_files import SAI_PREFIX, original_sd3_state_dict, write_hf_cache, write_single_file
from tests.conftest import text_inputs, tiny_transformer

RUN = dict(config="hybridstitch-30", num_inference_steps=4, guidance_scale=4.5, height=64, width=64,
           output_type="latent", progress=False)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: loading must never reach the network."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def run(pipe, seed=0):
    return pipe(generator=torch.Generator().manual_seed(seed), **RUN, **text_inputs(1)).images


@pytest.fixture(scope="module")
def folder_reference(tiny_dirs):
    return run(HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=tiny_dirs[1]))


def expect_error(fragment, fn):
    with pytest.raises(HybridStitchError) as e:
        fn()
    assert fragment in str(e.value), str(e.value)
    assert "huggingface.co" not in str(e.value)
    return str(e.value)


# -- single files ---------------------------------------------------------------------------------


def test_original_key_files_load_exactly_as_the_diffusers_folders(tmp_path, tiny_dirs, folder_reference):
    large = write_single_file(str(tmp_path / "sd3.5_large.safetensors"), tiny_transformer("large", 0))
    small = write_single_file(str(tmp_path / "sd3_medium.safetensors"), tiny_transformer("small", 1))
    pipe = HybridStitchPipeline.from_pretrained(large=large, small=small, large_config=tiny_dirs[0],
                                                small_config=os.path.join(tiny_dirs[1], "transformer", "config.json"))
    assert pipe.large.spec.qk_norm == "rms_norm" and pipe.large.spec.dual_attention_layers == (0,)
    assert torch.equal(run(pipe), folder_reference)


def test_diffusers_key_files_take_the_config_beside_them(tmp_path, tiny_dirs, folder_reference):
    for role, seed, folder in (("large", 0, tiny_dirs[0]), ("small", 1, tiny_dirs[1])):
        (tmp_path / role).mkdir()
        write_single_file(str(tmp_path / role / "model.safetensors"), tiny_transformer(role, seed), keys="diffusers")
        shutil.copy(os.path.join(folder, "transformer", "config.json"), tmp_path / role / "config.json")
    pipe = HybridStitchPipeline.from_pretrained(large=str(tmp_path / "large" / "model.safetensors"),
                                                small=str(tmp_path / "small" / "model.safetensors"))
    assert torch.equal(run(pipe), folder_reference)


@pytest.mark.parametrize("stored", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16])
@pytest.mark.parametrize("asked", [torch.float32, torch.bfloat16])
def test_files_stored_in_low_precision_are_upcast_into_the_dtype_asked(tmp_path, tiny_dirs, stored, asked):
    model = tiny_transformer("small", 1)
    path = write_single_file(str(tmp_path / "small_fp8.safetensors"), model, dtype=stored)
    ckpt = resolve_checkpoint(path, "small", tiny_dirs[1])
    loaded = load_transformer(ckpt, "small", asked)
    assert {p.dtype for p in loaded.parameters()} == {asked}
    for name, p in model.state_dict().items():  # the stored values, exactly, in the asked dtype
        assert torch.equal(loaded.state_dict()[name], p.to(stored).to(asked)), name


def test_all_in_one_files_with_text_encoders_load_the_transformer(tmp_path, tiny_dirs):
    extra = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8),
             "first_stage_model.decoder.conv_in.weight": torch.ones(4, 16, 3, 3)}
    model = tiny_transformer("large", 0)
    path = write_single_file(str(tmp_path / "sd3_incl_clips.safetensors"), model, extra=extra)
    loaded = load_transformer(resolve_checkpoint(path, "large", tiny_dirs[0]), "large")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_single_file_errors_say_what_to_pass(tmp_path, tiny_dirs):
    large = write_single_file(str(tmp_path / "large.safetensors"), tiny_transformer("large", 0))
    msg = expect_error("is a single file, which holds weights but no model config",
                       lambda: HybridStitchPipeline.from_pretrained(large=large, small=tiny_dirs[1]))
    assert "large_config=" in msg and "--large-config" in msg and "never fetches" in msg
    expect_error("the large config", lambda: HybridStitchPipeline.from_pretrained(
        large=large, small=tiny_dirs[1], large_config=str(tmp_path / "nope")))
    expect_error("could not load the large transformer", lambda: HybridStitchPipeline.from_pretrained(
        large=large, small=tiny_dirs[1], large_config=tiny_dirs[1]))  # the small model's config
    expect_error("large_config is for single-file checkpoints", lambda: HybridStitchPipeline.from_pretrained(
        large=tiny_dirs[0], small=tiny_dirs[1], large_config=tiny_dirs[0]))


def test_files_that_would_load_wrongly_are_refused(tmp_path, tiny_dirs):
    from safetensors.torch import save_file

    def load(path):
        return load_transformer(resolve_checkpoint(path, "large", tiny_dirs[0]), "large")

    sd = original_sd3_state_dict(tiny_transformer("large", 0))
    scaled = {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}
    scaled[SAI_PREFIX + "joint_blocks.0.x_block.attn.qkv.scale_weight"] = torch.tensor(0.5)
    save_file(scaled, str(tmp_path / "fp8_scaled.safetensors"))
    expect_error("per-tensor scales", lambda: load(str(tmp_path / "fp8_scaled.safetensors")))

    save_file({"decoder.conv_in.weight": torch.ones(4, 16, 3, 3)}, str(tmp_path / "vae.safetensors"))
    expect_error("holds no SD3 transformer weights", lambda: load(str(tmp_path / "vae.safetensors")))

    partial = {k: v for k, v in sd.items() if "final_layer.linear" not in k}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    expect_error("could not load the large transformer", lambda: load(str(tmp_path / "partial.safetensors")))

    no_norms = {k: v for k, v in sd.items() if ".ln_q." not in k and ".ln_k." not in k}  # the config asks for qk-norm
    save_file(no_norms, str(tmp_path / "no_norms.safetensors"))
    expect_error("lacks weights the config", lambda: load(str(tmp_path / "no_norms.safetensors")))

    (tmp_path / "truncated.safetensors").write_bytes(open(str(tmp_path / "vae.safetensors"), "rb").read()[:20])
    expect_error("not a readable .safetensors file", lambda: load(str(tmp_path / "truncated.safetensors")))

    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02")
    expect_error("pickled checkpoint", lambda: load(str(tmp_path / "model.ckpt")))
    (tmp_path / "notes.txt").write_text("x")
    expect_error("not a .safetensors checkpoint", lambda: load(str(tmp_path / "notes.txt")))


# -- Hugging Face cache ----------------------------------------------------------------------------


def test_cache_repo_folders_snapshots_and_repo_ids_load(tmp_path, tiny_dirs, folder_reference, monkeypatch):
    import huggingface_hub.constants

    cache = str(tmp_path / "hub")
    large_repo = write_hf_cache(cache, "org/tiny-large", tiny_dirs[0])
    small_repo = write_hf_cache(cache, "org/tiny-small", tiny_dirs[1])
    snapshot = os.path.join(small_repo, "snapshots", os.listdir(os.path.join(small_repo, "snapshots"))[0])
    pipe = HybridStitchPipeline.from_pretrained(large=large_repo, small=snapshot)
    assert torch.equal(run(pipe), folder_reference)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    pipe = HybridStitchPipeline.from_pretrained(large="org/tiny-large", small="org/tiny-small")
    assert torch.equal(run(pipe), folder_reference)
    expect_error("nor as a repo in the local Hugging Face cache", lambda: HybridStitchPipeline.from_pretrained(
        large="org/not-downloaded", small="org/tiny-small"))


def test_incomplete_cache_entries_are_named(tmp_path, tiny_dirs):
    cache = str(tmp_path / "hub")
    repo = write_hf_cache(cache, "org/partial", tiny_dirs[0], drop=("transformer",))
    msg = expect_error("incomplete download", lambda: load_transformer(repo, "large"))
    assert "hf download" in msg
    two = write_hf_cache(cache, "org/two", tiny_dirs[0], revision="a" * 40, ref=False)
    write_hf_cache(cache, "org/two", tiny_dirs[0], revision="b" * 40, ref=False)
    expect_error("has no refs/main and 2 snapshots", lambda: load_transformer(two, "large"))
    one = write_hf_cache(cache, "org/one", tiny_dirs[0], ref=False)
    assert load_transformer(one, "large").config.num_layers == 3  # the only snapshot
    gone = write_hf_cache(cache, "org/gone", tiny_dirs[0])
    shutil.rmtree(os.path.join(gone, "snapshots"))
    os.makedirs(os.path.join(gone, "snapshots"))
    expect_error("refs/main names revision", lambda: load_transformer(gone, "large"))


def test_a_cached_sd3_pipeline_brings_its_text_encoders(tmp_path, tiny_sd3_dirs):
    repo = write_hf_cache(str(tmp_path / "hub"), "org/tiny-sd3", tiny_sd3_dirs[0])
    pipe = HybridStitchPipeline.from_pretrained(large=repo, small=tiny_sd3_dirs[1])
    assert pipe.conditioner.kind == "sd3"
    out = pipe(prompt="a cat", num_inference_steps=2, height=64, width=64, progress=False)
    assert out.images[0].size == (64, 64)


# -- dtype and device -------------------------------------------------------------------------------


def test_bf16_is_the_default_for_qk_norm_models_on_cuda_with_bf16_only():
    sd35, sd3 = {"qk_norm": "rms_norm"}, {"qk_norm": None}
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_torch_dtype(cuda, sd35, bf16_supported=True) == torch.bfloat16
    assert default_torch_dtype(cuda, sd35, bf16_supported=False) == torch.float32
    assert default_torch_dtype(cuda, sd3, bf16_supported=True) == torch.float32
    assert default_torch_dtype(cpu, sd35, bf16_supported=True) == torch.float32


def test_default_dtype_on_cpu_is_float32_and_bad_dtypes_devices_are_refused(tiny_dirs):
    pipe = HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=tiny_dirs[1])
    assert pipe.dtype == torch.float32 and pipe.large.dtype == torch.float32
    expect_error("torch_dtype must be torch.float32, torch.bfloat16 or torch.float16", lambda:
                 HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=tiny_dirs[1], torch_dtype="bfloat16"))
    expect_error("is not a torch device", lambda: parse_device("gpu0"))
    if not torch.cuda.is_available():
        expect_error("CUDA is not available", lambda: parse_device("cuda"))


# -- text encoders: placement, T5 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_reference(tiny_sd3_dirs):
    pipe = HybridStitchPipeline.from_pretrained(large=tiny_sd3_dirs[0], small=tiny_sd3_dirs[1])
    return pipe(prompt="a cat", negative_prompt="a dog", generator=torch.Generator().manual_seed(0),
                **{**RUN, "output_type": "pil"}).images[0]


def sd3_image(pipe):
    return pipe(prompt="a cat", negative_prompt="a dog", generator=torch.Generator().manual_seed(0),
                **{**RUN, "output_type": "pil"}).images[0]


def same_image(a, b) -> bool:
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_encoders_on_the_cpu_give_the_same_images(tiny_sd3_dirs, sd3_reference):
    pipe = HybridStitchPipeline.from_pretrained(large=tiny_sd3_dirs[0], small=tiny_sd3_dirs[1], encoders="cpu")
    assert pipe.conditioner.text_device == torch.device("cpu")
    assert pipe.conditioner.pipe.text_encoder.device == torch.device("cpu")
    assert same_image(sd3_image(pipe), sd3_reference)


def test_no_encoders_means_prompt_embeds(tiny_sd3_dirs):
    pipe = HybridStitchPipeline.from_pretrained(large=tiny_sd3_dirs[0], small=tiny_sd3_dirs[1], encoders="none")
    assert pipe.conditioner.pipe.text_encoder is None and pipe.conditioner.pipe.text_encoder_3 is None
    expect_error("loaded with encoders='none'", lambda: pipe(prompt="a cat", **RUN))
    out = pipe(**{**RUN, "output_type": "pil"}, **text_inputs(1))  # the VAE is still there
    assert out.images[0].size == (64, 64)


def test_dropping_t5_pads_as_diffusers_does(tiny_sd3_dirs):
    from diffusers import StableDiffusion3Pipeline

    pipe = HybridStitchPipeline.from_pretrained(large=tiny_sd3_dirs[0], small=tiny_sd3_dirs[1], text_encoder_3="none")
    assert pipe.conditioner.pipe.text_encoder_3 is None
    kw = dict(prompt="a cat", negative_prompt="a dog", num_inference_steps=3, guidance_scale=4.5, height=64, width=64)
    ours = pipe(config="large", generator=torch.Generator().manual_seed(0), progress=False, **kw).images[0]
    ref_pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dirs[0], text_encoder_3=None, tokenizer_3=None,
                                                        local_files_only=True)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert same_image(ours, ref)


def test_a_t5_passed_in_is_used(tiny_sd3_dirs, sd3_reference):
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(os.path.join(tiny_sd3_dirs[0], "text_encoder_3"), local_files_only=True)
    pipe = HybridStitchPipeline.from_pretrained(large=tiny_sd3_dirs[0], small=tiny_sd3_dirs[1], text_encoder_3=t5)
    assert pipe.conditioner.pipe.text_encoder_3 is t5
    assert same_image(sd3_image(pipe), sd3_reference)


def test_a_folder_without_t5_says_how_to_drop_it(tmp_path, tiny_sd3_dirs):
    folder = tmp_path / "no_t5"
    shutil.copytree(tiny_sd3_dirs[0], folder)
    shutil.rmtree(folder / "text_encoder_3")
    expect_error("text_encoder_3='none'", lambda: HybridStitchPipeline.from_pretrained(
        large=str(folder), small=tiny_sd3_dirs[1]))
    pipe = HybridStitchPipeline.from_pretrained(large=str(folder), small=tiny_sd3_dirs[1], text_encoder_3="none")
    assert pipe.conditioner.pipe.text_encoder_3 is None


def test_single_file_large_takes_encoders_from_its_config_pipeline_folder(tmp_path, tiny_sd3_dirs, sd3_reference):
    large = write_single_file(str(tmp_path / "large.safetensors"), tiny_transformer("large", 0))
    pipe = HybridStitchPipeline.from_pretrained(large=large, small=tiny_sd3_dirs[1], large_config=tiny_sd3_dirs[0])
    assert same_image(sd3_image(pipe), sd3_reference)


def test_bad_encoder_options_are_refused_before_loading(tmp_path, tiny_dirs):
    missing = str(tmp_path / "missing")  # not loaded: the options are refused first
    expect_error("encoders must be one of 'device', 'cpu', 'none'", lambda: HybridStitchPipeline.from_pretrained(
        large=missing, small=missing, encoders="gpu"))
    expect_error("text_encoder_3 must be 'load', 'none'", lambda: HybridStitchPipeline.from_pretrained(
        large=missing, small=missing, text_encoder_3=False))
    expect_error("encoders must be one of", lambda: HybridStitchPipeline.from_engines(missing, encoders="gpu"))
    expect_error("num_threads must be an integer >= 1", lambda: HybridStitchPipeline.from_engines(missing, num_threads=0))
    expect_error("conditioner_folder", lambda: HybridStitchPipeline.from_pretrained(
        large=tiny_dirs[0], small=tiny_dirs[1], conditioner_folder=missing))


def test_a_missing_component_folder_is_named_without_a_hub_address(tmp_path):
    folder = tmp_path / "large"
    shutil.copytree(LARGE_DIR, folder)
    shutil.rmtree(folder / "prompt_encoder")
    msg = expect_error("names prompt_encoder, but", lambda: HybridStitchPipeline.from_pretrained(
        large=str(folder), small=SMALL_DIR))
    assert "copy the whole diffusers pipeline folder" in msg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encoders_on_the_cpu_feed_cuda_transformers(tiny_sd3_dirs, sd3_reference):
    pipe = HybridStitchPipeline.from_pretrained(large=tiny_sd3_dirs[0], small=tiny_sd3_dirs[1], device="cuda",
                                                torch_dtype=torch.float32, encoders="cpu")
    assert pipe.conditioner.pipe.text_encoder.device.type == "cpu" and pipe.conditioner.pipe.vae.device.type == "cuda"
    image = sd3_image(pipe)
    assert image.size == (64, 64)


def test_a_hand_written_config_beside_a_file_takes_diffusers_defaults(tmp_path, tiny_dirs):
    import json

    model = tiny_transformer("small", 1)
    path = write_single_file(str(tmp_path / "small.safetensors"), model)
    keep = ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim", "pooled_projection_dim",
            "caption_projection_dim", "sample_size", "pos_embed_max_size")  # in_channels, patch_size... left out
    (tmp_path / "config.json").write_text(json.dumps({k: model.config[k] for k in keep}))
    pipe = HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=path)
    assert pipe.small.spec.in_channels == 16 and pipe.small.spec.patch_size == 2
    (tmp_path / "config.json").write_text(json.dumps({**{k: model.config[k] for k in keep}, "in_channels": "x"}))
    expect_error("has an invalid value", lambda: HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=path))
    (tmp_path / "config.json").write_text("[1, 2]")
    expect_error("holds a JSON list, not an object", lambda: HybridStitchPipeline.from_pretrained(
        large=tiny_dirs[0], small=path))
