"""Serving on NVIDIA Triton Inference Server: ``hybridstitch serve`` and its client.

``runner`` (requests -> images, the interface the batching scheduler plugs into), ``protocol``
(the model's tensors), ``settings``, ``repository`` (the generated model repository), ``bundle``
(the server nvidia-pytriton ships), ``server`` (its process), ``model`` (the Python-backend
model), ``loading``, ``client``, ``cli``. Triton and tritonclient are imported only where used,
so ``import hybridstitch.serve`` works without the ``serve`` extra.
"""

from .runner import BatchingRunner, GenerationRequest, RequestRunner, SequentialRunner, open_runner

__all__ = ["BatchingRunner", "GenerationRequest", "RequestRunner", "SequentialRunner", "open_runner"]
