"""The Triton Python-backend model: each request through the :class:`RequestRunner`.

Runs inside Triton's Python backend stub (``triton_python_backend_utils`` exists only there).
``execute`` hands each request to the runner and returns at once; each request's response is
sent by its own response sender when its future resolves, so a request never waits for its
batch-mates, and a bad request gets its own error while the others go on. At most
``max_inflight`` requests are in the runner: beyond that ``execute`` waits, the Triton instance
stays busy, and further requests wait in Triton's queue, where the dynamic batcher groups them
and the queue metrics see them.
"""

from __future__ import annotations

import functools
import os
import threading
import traceback

from ..errors import HybridStitchError
from ..fileio import atomic_write_text
from .protocol import request_from_inputs, trace_bytes
from .repository import LOAD_ERROR_FILE, SETTINGS_FILE
from .runner import open_runner
from .settings import ModelSettings


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

        from .loading import load_pipeline

        self._pb = pb_utils
        model_dir = args["model_repository"]  # this model's folder in the repository
        try:
            with open(os.path.join(model_dir, SETTINGS_FILE), encoding="utf-8") as f:
                settings = ModelSettings.from_json(f.read())
            device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
            pipe = load_pipeline(settings, device)
        except Exception as e:
            # `hybridstitch serve` reads this to say in one line why the start failed.
            reason = str(e) if isinstance(e, HybridStitchError) else f"{type(e).__name__}: {e}"
            atomic_write_text(os.path.join(model_dir, LOAD_ERROR_FILE), " ".join(reason.split()))
            raise
        self._defaults = settings.request_defaults
        self._slots = threading.BoundedSemaphore(settings.max_inflight)
        self._runner = open_runner(pipe, max_queue=settings.max_inflight)

    def execute(self, requests):
        pb = self._pb
        for request in requests:
            sender = request.get_response_sender()

            def get(name, request=request):
                tensor = pb.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            try:
                generation = request_from_inputs(get, self._defaults)
            except HybridStitchError as e:
                self._send_error(sender, str(e), pb.TritonError.INVALID_ARG)
                continue
            self._slots.acquire()  # the runner is full: wait, keeping later requests in Triton's queue
            try:
                future = self._runner.submit(generation)
            except HybridStitchError as e:  # closed: the server is shutting down
                self._slots.release()
                self._send_error(sender, str(e), pb.TritonError.UNAVAILABLE)
                continue
            future.add_done_callback(functools.partial(self._respond, sender))
        return None  # every response goes through its request's sender

    def _respond(self, sender, future) -> None:
        """Runs on the runner's thread when one request is done."""
        pb = self._pb
        try:
            try:
                image, trace = future.result()
            except HybridStitchError as e:
                self._send_error(sender, str(e), pb.TritonError.INVALID_ARG)
            except BaseException as e:  # noqa: BLE001 - a bug (or a cancelled future): this request fails, the server goes on
                pb.Logger.log_error(f"hybridstitch: request failed: {traceback.format_exc()}")
                self._send_error(sender, f"internal error in hybridstitch ({type(e).__name__}: {e}); see the server log",
                                 pb.TritonError.INTERNAL)
            else:
                outputs = [pb.Tensor("image", image[None]), pb.Tensor("trace", trace_bytes(trace))]  # [1, H, W, C], [1, 1]
                sender.send(pb.InferenceResponse(output_tensors=outputs), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self._slots.release()

    def _send_error(self, sender, message: str, code) -> None:
        pb = self._pb
        pb.Logger.log_info(f"hybridstitch: request refused: {message}")
        sender.send(pb.InferenceResponse(error=pb.TritonError(message, code)), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        if hasattr(self, "_runner"):  # absent when initialize failed
            self._runner.close()  # queued requests fail with "shut down"; the one running finishes

