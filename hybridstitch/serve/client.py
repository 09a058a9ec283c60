"""A client of the ``hybridstitch`` model over HTTP (``tritonclient``, imported when used).

    client = HybridStitchClient("http://127.0.0.1:8000")
    image, trace = client.generate("a handwritten 3", seed=0, method="testbed-30")  # uint8 [H, W, C], dict

Any KServe v2 client works as well; docs/serving.md has the plain JSON request.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import HybridStitchError
from .bundle import INSTALL_HINT
from .protocol import INPUTS, MODEL_NAME, input_arrays

DATATYPES = {spec.name: spec.datatype for spec in INPUTS}


def _http():
    try:
        import tritonclient.http as http
        from tritonclient.utils import InferenceServerException
    except ImportError:
        raise HybridStitchError(f"the client needs tritonclient: {INSTALL_HINT}") from None
    return http, InferenceServerException


def _host_port(url: str) -> str:
    """tritonclient takes host:port; accept http://host:port too."""
    if url.startswith("https://"):
        raise HybridStitchError("https is not supported by this client; terminate TLS in front of the server and use http://")
    return url.removeprefix("http://").rstrip("/")


class HybridStitchClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout_s: float = 600.0):
        self._http, self._error = _http()
        self.url = url
        # One connection: a client per thread for concurrent requests (the benchmark does so).
        self._client = self._http.InferenceServerClient(url=_host_port(url), connection_timeout=timeout_s,
                                                        network_timeout=timeout_s)

    def generate(self, prompt: str, seed: int, negative_prompt: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, method: str | None = None) -> tuple[np.ndarray, dict]:
        """One image: uint8 [H, W, C] and the run's trace. Inputs left None take the server's defaults."""
        inputs = []
        for name, array in input_arrays(prompt, seed, negative_prompt, steps, guidance_scale, method).items():
            tensor = self._http.InferInput(name, list(array.shape), DATATYPES[name])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [self._http.InferRequestedOutput(name, binary_data=True) for name in ("image", "trace")]
        result = self._call(lambda: self._client.infer(MODEL_NAME, inputs, outputs=outputs))
        image = result.as_numpy("image")[0]  # [H, W, C]
        trace = json.loads(result.as_numpy("trace").reshape(-1)[0])
        return image, trace

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(MODEL_NAME))
        except (OSError, self._error):
            return False

    def statistics(self) -> dict:
        """Triton's statistics of the model (counts, queue and compute times, batch sizes)."""
        return self._call(lambda: self._client.get_inference_statistics(MODEL_NAME))

    def _call(self, fn):
        try:
            return fn()
        except self._error as e:
            raise HybridStitchError(f"the server at {self.url} refused the request: {e.message()}") from None
        except OSError as e:  # refused, reset, unreachable
            raise HybridStitchError(
                f"no hybridstitch server answers at {self.url} ({e.strerror or e}); start one with hybridstitch serve, "
                "or check --url"
            ) from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "HybridStitchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batch_sizes(statistics: dict) -> dict[int, int]:
    """How many batches of each size Triton ran, from :meth:`HybridStitchClient.statistics`."""
    out: dict[int, int] = {}
    for model in statistics.get("model_stats", []):
        for entry in model.get("batch_stats", []):
            out[int(entry["batch_size"])] = out.get(int(entry["batch_size"]), 0) + int(entry["compute_infer"]["count"])
    return dict(sorted(out.items()))
