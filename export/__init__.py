"""The builder: ONNX export of each transformer variant, TensorRT engine builds, and the
``hybridstitch-export`` CLI. The runtime (:mod:`hybridstitch.engine`) never imports this package;
the manifest it writes is :mod:`hybridstitch.engine.manifest`'s.

    from hybridstitch.export import ExportRequest, export_engines
    export_engines(ExportRequest(large="sd35-large", small="sd3-medium", height=768, width=768), "engines/")

    # TensorRT engines for this machine's GPU (docs/tensorrt.md)
    export_engines(ExportRequest(..., precision="fp16", backend="tensorrt",
                                 tensorrt=TensorRTOptions(attention="plugin")), "engines/")

Layout: :mod:`.request` (what is asked), :mod:`.plan` (the graphs and manifest to have),
:mod:`.driver` (building them), :mod:`.graphs` (the torch modules exported), :mod:`.onnx_steps`
(the build steps), :mod:`.tensorrt_build` / :mod:`.torch_tensorrt_build` (TensorRT engines).
"""

from hybridstitch.engine.builds import TensorRTOptions
from hybridstitch.engine.manifest import FORMAT_VERSION, GraphEntry, Manifest, read_manifest

from .driver import export_engines
from .memory_plan import memory_plan, plan_for_request
from .plan import plan_export
from .request import ExportRequest

__all__ = ["FORMAT_VERSION", "ExportRequest", "GraphEntry", "Manifest", "export_engines", "memory_plan", "plan_export",
           "plan_for_request", "read_manifest", "TensorRTOptions"]
