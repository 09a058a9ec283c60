"""The dependency rules of DESIGN.md section 4, enforced by reading every module's imports with ``ast``
(function-level and relative imports included, so a lazy import cannot hide a cycle):

* the method files import nothing of the package but each other;
* ``engine/``, ``export/`` and ``plugins/`` never import the pipeline, the CLI, the demo, the bench
  harness or the testbed;
* the runtime (``engine/``) never imports the builder (``export/``), and ``plugins/`` neither;
* the engine backends are siblings: they never import each other;
* ``plugins/cached_kv.py`` (the op's one definition) imports none of its forms.

Plus the same rule at run time: loading engines and running them never imports the builder.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# folder -> the package it is mapped to (pyproject's package-dir)
PACKAGES = {"hybridstitch": "hybridstitch", "engine": "hybridstitch.engine", "export": "hybridstitch.export",
            "plugins": "hybridstitch.plugins"}
# The method: pure functions and small classes over tensors, no backend.
METHOD = {f"hybridstitch.{m}" for m in (
    "config", "policy", "masks", "tokens", "metrics", "latency_model", "trace", "errors", "fileio", "denoiser", "step",
    "scheduling", "checks", "kvcache", "sample",
)}
APPLICATION = ("hybridstitch.pipeline", "hybridstitch.cli", "hybridstitch.demo", "hybridstitch.bench",
               "hybridstitch.testbed", "hybridstitch.serve")
OP_FORMS = ("torch_op", "triton_kernel", "onnx_op", "tensorrt_plugin", "aot", "onnx_for_tensorrt",
            "torch_tensorrt_plugin")
LINE_LIMIT = 500


def module_files() -> dict[str, str]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for folder, package in PACKAGES.items():
        for root, dirs, files in os.walk(os.path.join(REPO, folder)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "weights")]
            rel = os.path.relpath(root, os.path.join(REPO, folder))
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    out[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(root, f)
    return out


MODULES = module_files()


def imports_of(source: str, module: str, is_package: bool, known: set[str] = frozenset()) -> set[str]:
    """The package-internal modules ``source`` (the module ``module``) imports, anywhere in the file."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for a in node.names:  # `from pkg import submodule` imports the submodule
                if f"{target}.{a.name}" in known:
                    found.add(f"{target}.{a.name}")
    return {m for m in found if m == "hybridstitch" or m.startswith("hybridstitch.")}


def graph() -> dict[str, set[str]]:
    known = set(MODULES)
    out = {}
    for module, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            out[module] = imports_of(f.read(), module, path.endswith("__init__.py"), known)
    return out


IMPORTS = graph()


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(rule) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, targets in IMPORTS.items() for dst in targets if rule(src, dst))


def test_the_scanner_sees_lazy_relative_and_submodule_imports():
    source = textwrap.dedent("""
        import os
        from . import torch_op
        from .. import pipeline
        def later():
            from hybridstitch.export.driver import export_engines
            import hybridstitch.testbed
    """)
    known = {"hybridstitch.plugins.torch_op", "hybridstitch.pipeline"}
    found = imports_of(source, "hybridstitch.plugins.cached_kv", False, known)
    assert found == {"hybridstitch.plugins", "hybridstitch.plugins.torch_op", "hybridstitch", "hybridstitch.pipeline",
                     "hybridstitch.export.driver", "hybridstitch.testbed"}


def test_every_source_folder_is_scanned():
    for must in ("hybridstitch.pipeline", "hybridstitch.engine.base", "hybridstitch.export.driver",
                 "hybridstitch.plugins.cached_kv", *METHOD):
        assert must in MODULES


def test_method_files_import_only_the_method():
    assert violations(lambda s, d: s in METHOD and d not in METHOD and d != "hybridstitch") == []


def test_runtime_builder_and_plugins_never_import_the_application():
    lower = ("hybridstitch.engine", "hybridstitch.export", "hybridstitch.plugins")
    assert violations(lambda s, d: within(s, lower) and within(d, APPLICATION)) == []


def test_the_runtime_never_imports_the_builder():
    assert violations(lambda s, d: within(s, ("hybridstitch.engine", "hybridstitch.plugins"))
                      and within(d, ("hybridstitch.export",))) == []
    assert violations(lambda s, d: within(s, ("hybridstitch.plugins",)) and within(d, ("hybridstitch.engine",))) == []


def test_backends_are_siblings():
    ort, trt = "hybridstitch.engine.onnxruntime_backend", "hybridstitch.engine.tensorrt_backend"
    assert violations(lambda s, d: {s, d} == {ort, trt}) == []


def test_the_op_definition_imports_none_of_its_forms():
    forms = {f"hybridstitch.plugins.{f}" for f in OP_FORMS}
    assert IMPORTS["hybridstitch.plugins.cached_kv"] & forms == set()


def test_modules_stay_small_or_say_why():
    """No module over ~500 lines without a reason stated in its docstring ("Over 500 lines: ...")."""
    long = []
    for module, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        doc = ast.get_docstring(ast.parse(source)) or ""
        if source.count("\n") > LINE_LIMIT and "Over 500 lines:" not in doc:
            long.append(f"{module} ({source.count(chr(10))} lines)")
    assert long == []


@pytest.mark.slow
def test_loading_and_running_engines_never_imports_the_builder(tiny_engines):
    folder, _ = tiny_engines
    script = textwrap.dedent(f"""
        import sys, torch
        from hybridstitch import HybridStitchPipeline
        pipe = HybridStitchPipeline.from_engines({folder!r}, num_threads=1)
        g = torch.Generator().manual_seed(0)
        out = pipe(prompt_embeds=torch.randn(1, 7, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 16, generator=g),
                   negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
                   negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g), config="hybridstitch-30",
                   num_inference_steps=4, guidance_scale=2.0, height=64, width=64, output_type="latent", progress=False)
        assert out.trace.stage_counts, out.trace
        loaded = sorted(m for m in sys.modules if m.startswith("hybridstitch.export"))
        print("LOADED", loaded)
        sys.exit(1 if loaded else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
