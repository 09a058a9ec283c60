"""The Triton Python-backend model: each request through the :class:`RequestRunner`.

Runs inside Triton's Python backend stub (``triton_python_backend_utils`` exists only there).
``execute`` hands each request to the runner and returns at once; each request's response is
sent by its own response sender when its future resolves, so a request never waits for its
batch-mates, and a bad request gets its own error while the others go on. At most
``max_inflight`` requests are in the runner: beyond that ``execute`` waits, the Triton instance
stays busy, and further requests wait in Triton's queue, where the dynamic batcher groups them
and its queue metrics see them.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
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
                self._refuse(sender, str(e), pb.TritonError.INVALID_ARG)
                continue
            self._slots.acquire()  # the runner is full: wait, keeping later requests in Triton's queue
            try:
                future = self._runner.submit(generation)
            except HybridStitchError as e:  # closed: the server is shutting down
                self._slots.release()
                self._refuse(sender, str(e), pb.TritonError.UNAVAILABLE)
                continue
            future.add_done_callback(functools.partial(self._respond, sender))
        return None  # every response goes through its request's sender

    def _respond(self, sender, future) -> None:
        """Runs on the runner's thread when one request is done."""
        pb = self._pb
        try:
            image, trace = future.result()
        except HybridStitchError as e:
            response = self._error(str(e), pb.TritonError.INVALID_ARG)
        except BaseException as e:  # noqa: BLE001 - a bug (or a cancelled future): this request fails, the server goes on
            # stderr, not pb_utils.Logger: this runs on the runner's thread, and the stub's IPC objects
            # are not safe there (its custom metrics segfaulted from such a thread in 2.51).
            print(f"hybridstitch: request failed: {traceback.format_exc()}", file=sys.stderr, flush=True)
            response = self._error(f"internal error in hybridstitch ({type(e).__name__}: {e}); see the server log",
                                   pb.TritonError.INTERNAL)
        else:
            outputs = [pb.Tensor("image", image[None]), pb.Tensor("trace", trace_bytes(trace))]  # [1, H, W, C], [1, 1]
            response = pb.InferenceResponse(output_tensors=outputs)
        try:
            sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self._slots.release()

    def _refuse(self, sender, message: str, code) -> None:
        """Answers a request the runner never took."""
        sender.send(self._error(message, code), flags=self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _error(self, message: str, code):
        return self._pb.InferenceResponse(error=self._pb.TritonError(message, code))

    def finalize(self) -> None:
        if hasattr(self, "_runner"):  # absent when initialize failed
            self._runner.close()  # queued requests fail with "shut down"; the one running finishes
            # Free the engines (ONNX Runtime sessions, their thread pools) now, while the interpreter
            # is whole, not in the stub's exit path.
            del self._runner
            gc.collect()

