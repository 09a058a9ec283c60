"""ONNX export of each transformer variant, the engine manifest, and the ``hybridstitch-export`` CLI.

    from hybridstitch.export import ExportRequest, export_engines
    export_engines(ExportRequest(large="sd35-large", small="sd3-medium", height=768, width=768), "engines/")

    # TensorRT engines for this machine's GPU (docs/tensorrt.md)
    export_engines(ExportRequest(..., precision="fp16", backend="tensorrt",
                                 tensorrt=TensorRTOptions(attention="plugin")), "engines/")
"""

from .manifest import FORMAT_VERSION, GraphEntry, Manifest, read_manifest
from .onnx_export import ExportRequest, export_engines, plan_export
from .tensorrt_build import TensorRTOptions

__all__ = ["FORMAT_VERSION", "ExportRequest", "GraphEntry", "Manifest", "export_engines", "plan_export", "read_manifest",
           "TensorRTOptions"]
