"""Which ONNX Runtime can check a graph on the GPU: the CUDA execution provider, or a refusal that says why.

The TensorRT build first runs every exported graph in ONNX Runtime against the torch graph it
came from (the parity check, ``export/tensorrt_build.py``). On a GPU machine that check is
meant to run on ONNX Runtime's CUDA provider; on the CPU provider an SD3.5 Large graph takes
very long, and a silent fall-back hides a broken install. Two ways to end up there:

- ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` installed side by side. Both wheels install
  the same ``onnxruntime`` package folder, so whichever pip wrote last wins and uninstalling
  either breaks the other; the CUDA provider is typically gone (microsoft/onnxruntime#26996).
  pip cannot make two distributions exclusive, and this package's base requirements name
  ``onnxruntime`` (the embedded CPU runtime), so ``onnxruntime-gpu`` is deliberately not an
  extra of it: docs/tensorrt.md gives the swap (uninstall both, install ``onnxruntime-gpu``).
- ``onnxruntime-gpu`` whose CUDA provider cannot load (its CUDA / cuDNN libraries are missing
  or of another major version): ONNX Runtime then logs a warning and runs the session on the
  CPU. :func:`require_session_on_cuda` catches that on the session itself.

Nothing here imports ONNX Runtime at import time; both checks take their inputs as arguments
so tests hand them fakes.
"""

from __future__ import annotations

from collections.abc import Iterable

from hybridstitch.errors import HybridStitchError

CUDA_PROVIDER = "CUDAExecutionProvider"
_SWAP = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.20'"


def installed_onnxruntime_distributions() -> list[str]:
    """Names of the installed ONNX Runtime builds that provide the ``onnxruntime`` package (from pip's metadata)."""
    from importlib import metadata

    names = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-training"}
    found = set()
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name in names:
            found.add(name)
    return sorted(found)


def require_cuda_provider(ort=None, distributions: Iterable[str] | None = None) -> list[str]:
    """The providers for a GPU parity check, CUDA first; raise when ONNX Runtime has no CUDA provider.

    ``ort``: the imported ``onnxruntime`` module (default: import it); ``distributions``: the
    installed ONNX Runtime distributions (default: :func:`installed_onnxruntime_distributions`).
    Call it where the parity check would pick the CUDA provider on a machine with a GPU, instead
    of falling back to the CPU provider.
    """
    if ort is None:
        import onnxruntime as ort
    dists = sorted(distributions if distributions is not None else installed_onnxruntime_distributions())
    if len(dists) > 1:
        raise HybridStitchError(
            f"{' and '.join(dists)} are installed together: they share one 'onnxruntime' package folder and the "
            f"GPU build loses its CUDA provider (microsoft/onnxruntime#26996). Keep only the GPU build: {_SWAP}"
        )
    available = list(ort.get_available_providers())
    if CUDA_PROVIDER not in available:
        build = dists[0] if dists else "onnxruntime"
        raise HybridStitchError(
            f"ONNX Runtime ({build} {getattr(ort, '__version__', '?')}) has no CUDA provider (available: "
            f"{', '.join(available)}), so the parity check would run SD3-sized graphs on the CPU. Install the GPU build "
            f"({_SWAP}), or skip the check with --verify none once a configuration is known good"
        )
    return [CUDA_PROVIDER, "CPUExecutionProvider"]


def require_session_on_cuda(session) -> None:
    """Raise when an ``InferenceSession`` asked for the CUDA provider ended up without it.

    ONNX Runtime only warns when the CUDA provider fails to load (a CUDA or cuDNN library it
    was built against is missing) and runs the session on the CPU; ``session.get_providers()``
    tells the truth.
    """
    providers = list(session.get_providers())
    if CUDA_PROVIDER not in providers:
        raise HybridStitchError(
            f"ONNX Runtime could not start its CUDA provider for the parity check (the session runs on "
            f"{', '.join(providers) or 'nothing'}): its log above names the missing CUDA / cuDNN library. Install the "
            "onnxruntime-gpu build made for this machine's CUDA major version, or skip the check with --verify none"
        )


__all__ = ["CUDA_PROVIDER", "installed_onnxruntime_distributions", "require_cuda_provider", "require_session_on_cuda"]
