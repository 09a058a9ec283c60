"""Backends behind the :class:`hybridstitch.denoiser.Denoiser` interface.

``torch`` (diffusers modules) is always available; ``onnxruntime`` and ``tensorrt`` import
their runtimes lazily.
"""
