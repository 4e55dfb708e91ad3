"""Embeddings from the Triton ensembles (query_encoder, product_encoder, image_encoder).

Only tritonclient and numpy: tokenization and image decoding happen inside Triton. The model and
tensor names are the repository's public interface, from core.specs (see model_repository/README.md);
the embedding width is read from the server, never assumed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from core.specs import (
    DESCRIPTION,
    EMBEDDING,
    FINGERPRINT_PARAMETER,
    IMAGE,
    IMAGE_ENCODER,
    PRODUCT_ENCODER,
    QUERY,
    QUERY_ENCODER,
    TITLE,
    model_name,
)

logger = logging.getLogger(__name__)

OUTPUT = EMBEDDING


class EncoderUnavailable(RuntimeError):
    """Triton cannot be reached, or a model is not ready."""


class EncoderFault(EncoderUnavailable):
    """Triton answered with a failure of its own (a crashed model stub, an ONNX Runtime error).

    Not the input's fault: callers retry it like an outage and then stop loudly, never treat the
    product as a bad image (that would silently re-embed a whole catalog text-only).
    """


class EncodingError(ValueError):
    """Triton refused one request as invalid input (bad image, empty query...): the message says why."""


class _Miscounted(Exception):
    """Triton's ensemble miscounted the strings of a well-formed request (see MISCOUNTED_STRINGS)."""


# How Triton says "the caller's input is invalid" (TRITONSERVER_ERROR_INVALID_ARG) on each protocol;
# the Python models answer bad input with TritonError.INVALID_ARG. Every other status is a server fault.
INVALID_INPUT_STATUS = {"grpc": ("StatusCode.INVALID_ARGUMENT",), "http": ("400",)}
# Triton 2.51's ensemble, right after an ensemble request failed in one branch (a broken photo) while
# another branch was still running, now and then rejects a later well-formed request with "unexpected
# number of string elements 2 for inference input 'TITLE', expecting 1" (seen 1 in 40 runs of 6 products).
# Our BYTES tensors hold exactly their shape's element count by construction, so this is the server's
# fault: sent again, the same request succeeds.
MISCOUNTED_STRINGS = "number of string elements"
RESENDS = 2


def protocol_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
    return module


class TritonEncoder:
    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", timeout_s: float = 30.0, tag: str = ""):
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self.tag = tag  # which model set: the ensembles' served names are model_name(QUERY_ENCODER, tag)...
        model_name(QUERY_ENCODER, tag)  # a malformed tag fails here, not on the first request
        self.module = protocol_module(protocol)
        kwargs = {"network_timeout": timeout_s} if protocol == "http" else {}
        self.client = self.module.InferenceServerClient(url, **kwargs)
        # Every gRPC call carries a deadline (HTTP's is the connection's network_timeout above).
        self._deadline = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        self._metadata: dict[str, dict] = {}

    def _unavailable(self, what: str) -> EncoderUnavailable:
        return EncoderUnavailable(
            f"{what} at {self.protocol}://{self.url}. Start the server with "
            "`python -m export.serve --model-repository model_repository` (or `make demo`), "
            "or pass --triton-url / --protocol to reach yours.")

    def served(self, model: str) -> str:
        """The served name of a core.specs model name in this encoder's model set."""
        return model_name(model, self.tag)

    def with_tag(self, tag: str) -> TritonEncoder:
        """An encoder of the same server for another model set (its own connection)."""
        return TritonEncoder(self.url, self.protocol, self.timeout_s, tag)

    def check_ready(self, models: Sequence[str] = (QUERY_ENCODER,)) -> None:
        try:
            live = self.client.is_server_live(**self._deadline)
        except Exception as exc:
            raise self._unavailable(f"Triton is unreachable ({type(exc).__name__})") from None
        if not live:
            raise self._unavailable("Triton is not live")
        for model in map(self.served, models):
            try:
                ready = self.client.is_model_ready(model, **self._deadline)
            except Exception as exc:
                raise self._unavailable(f"Triton did not answer for model {model!r} ({type(exc).__name__})") from None
            if not ready:
                raise self._unavailable(f"model {model!r} is not ready")

    def metadata(self, model: str) -> dict:
        model = self.served(model)
        if model not in self._metadata:
            try:
                extra = {"as_json": True, **self._deadline} if self.protocol == "grpc" else {}
                meta = self.client.get_model_metadata(model, **extra)
            except Exception as exc:
                raise self._unavailable(f"no metadata for model {model!r} ({exc})") from None
            self._metadata[model] = meta
        return self._metadata[model]

    def input_names(self, model: str) -> list[str]:
        return [t["name"] for t in self.metadata(model)["inputs"]]

    @property
    def embed_dim(self) -> int:
        output = next(t for t in self.metadata(QUERY_ENCODER)["outputs"] if t["name"] == OUTPUT)
        return int(output["shape"][-1])

    @property
    def fingerprint(self) -> str:
        """Which weights and graph variant Triton serves (export's "fingerprint" config parameter)."""
        if "fingerprint" not in self._metadata:
            try:
                config = self.client.get_model_config(self.served(QUERY_ENCODER), **(
                    {"as_json": True, **self._deadline} if self.protocol == "grpc" else {}))
            except Exception as exc:
                raise self._unavailable(f"no config for model {self.served(QUERY_ENCODER)!r} ({exc})") from None
            config = config.get("config", config)  # gRPC wraps it, HTTP does not
            value = config.get("parameters", {}).get(FINGERPRINT_PARAMETER, {}).get("string_value", "")
            self._metadata["fingerprint"] = value or "unknown"  # a repository exported before fingerprints
        return self._metadata["fingerprint"]

    @property
    def multimodal(self) -> bool:
        return IMAGE in self.input_names(PRODUCT_ENCODER)

    def infer(self, model: str, inputs: dict[str, Sequence]) -> np.ndarray:
        tensors = []
        for name, values in inputs.items():
            array = np.empty((len(values), 1), dtype=object)
            for i, v in enumerate(values):
                array[i, 0] = v if isinstance(v, bytes) else str(v).encode("utf-8")
            tensor = self.module.InferInput(name, list(array.shape), "BYTES")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        outputs = [self.module.InferRequestedOutput(OUTPUT)]
        model = self.served(model)
        for resend in range(RESENDS + 1):
            try:
                return self._infer_once(model, tensors, outputs)
            except _Miscounted as exc:
                if resend == RESENDS:
                    raise EncoderFault(f"Triton's {model} kept miscounting a well-formed request's strings "
                                       f"({exc}): restart Triton") from None
                logger.warning("Triton's %s miscounted a well-formed request (%s): sending it again", model, exc)
                time.sleep(0.05 * (resend + 1))

    def _infer_once(self, model: str, tensors: list, outputs: list) -> np.ndarray:
        try:
            result = self.client.infer(model, tensors, outputs=outputs, **self._deadline)
        except self.module.InferenceServerException as exc:
            message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
            status = str(exc.status() or "")
            if status in INVALID_INPUT_STATUS[self.protocol] and MISCOUNTED_STRINGS in message:
                raise _Miscounted(message) from None
            if status in INVALID_INPUT_STATUS[self.protocol]:
                raise EncodingError(message) from None
            if any(s in status for s in ("UNAVAILABLE", "DEADLINE", "503")) or "connect" in message.lower():
                raise self._unavailable(f"Triton failed ({message})") from None
            raise EncoderFault(
                f"Triton's {model} failed on the server ({status or 'no status'}: {message}). This is not the "
                "input's fault: read the Triton log (runs/triton.log with `python -m export.serve`), fix or "
                "re-export the model repository, restart Triton and run again.") from None
        except Exception as exc:  # connection refused, reset, timeout
            raise self._unavailable(f"Triton request failed ({type(exc).__name__}: {exc})") from None
        return result.as_numpy(OUTPUT)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001  (closing a broken connection must not raise)
            pass

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        if any(not t or not t.strip() for t in texts):
            raise EncodingError("empty query: type some words to search for")
        return self.infer(QUERY_ENCODER, {QUERY: list(texts)})

    def embed_products(self, titles: Sequence[str], descriptions: Sequence[str],
                       images: Sequence[bytes | None] | None = None) -> np.ndarray:
        """Product embeddings; an image of None or b"" is a product without a photo."""
        inputs = {TITLE: list(titles), DESCRIPTION: list(descriptions)}
        if self.multimodal:
            inputs[IMAGE] = [img or b"" for img in (images if images is not None else [None] * len(titles))]
        return self.infer(PRODUCT_ENCODER, inputs)

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        if not self.multimodal:
            raise EncodingError("the served model is text-only: it has no image encoder")
        if any(not img for img in images):
            raise EncodingError("empty image")
        return self.infer(IMAGE_ENCODER, {IMAGE: list(images)})
