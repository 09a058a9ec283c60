"""The testbed's conditioner lives in the testbed package and is found through ``model_index.json``."""

import json
import os
import subprocess
import sys

import pytest

from hybridstitch import HybridStitchError
from hybridstitch.loading import CONDITIONER_LOADERS, load_conditioner, register_conditioner
from hybridstitch.testbed import LARGE_DIR, SMALL_DIR
from hybridstitch.testbed.conditioner import TestbedConditioner


def test_the_method_package_imports_no_testbed_code():
    # A fresh interpreter: importing the pipeline, its loading and conditioning code leaves the testbed unloaded.
    code = ("import sys, hybridstitch, hybridstitch.conditioning, hybridstitch.loading, hybridstitch.pipeline; "
            "print(sorted(m for m in sys.modules if m.startswith('hybridstitch.testbed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_testbed_folders_resolve_by_class_name():
    assert json.load(open(os.path.join(LARGE_DIR, "model_index.json")))["_class_name"] == "HybridStitchTestbedPipeline"
    cond = load_conditioner(LARGE_DIR)
    assert isinstance(cond, TestbedConditioner) and cond.vae_scale_factor == 1
    enc = cond.encode(["a handwritten 3"], [""], True, "cpu")
    assert enc.prompt_embeds.shape[0] == 2 and enc.pooled.shape[0] == 2  # [uncond, cond]
    assert load_conditioner(SMALL_DIR) is None  # the small folder holds a transformer only


def _folder(tmp_path, class_name):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "transformer": ["diffusers", "x"]}))
    return str(folder)


def loader_for_tests(folder, index, torch_dtype=None):
    return ("loaded", os.path.basename(folder), index["_class_name"])


def test_registered_loaders_are_imported_by_path(tmp_path, monkeypatch):
    monkeypatch.setitem(CONDITIONER_LOADERS, "MyPipeline", "placeholder")  # the registration is undone after the test
    register_conditioner("MyPipeline", f"{__name__}:loader_for_tests")
    assert load_conditioner(_folder(tmp_path, "MyPipeline")) == ("loaded", "pipe", "MyPipeline")


def test_unknown_class_without_text_encoders_has_no_conditioner(tmp_path):
    assert load_conditioner(_folder(tmp_path, "SomeOtherPipeline")) is None


def test_a_loader_that_cannot_be_imported_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(CONDITIONER_LOADERS, "Broken", "no_such_module_here:load")
    with pytest.raises(HybridStitchError, match="could not be imported.*pass prompt_embeds"):
        load_conditioner(_folder(tmp_path, "Broken"))
    with pytest.raises(HybridStitchError, match="'module:function'"):
        register_conditioner("Broken", "no_colon")
