"""Embeddings from the Triton ensembles (query_encoder, product_encoder, image_encoder).

Only tritonclient and numpy: tokenization and image decoding happen inside Triton. The model and
tensor names are the repository's public interface, from core.specs (see model_repository/README.md);
the embedding width is read from the server, never assumed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from client.deadlines import SEARCH_TIMEOUT_S
from core.fusion_rule import FusionRule, ranking_model
from core.preprocess import DEFAULT_MAX_PIXELS, ImageError, decode_image
from core.specs import (
    DESCRIPTION,
    EMBEDDING,
    FINGERPRINT_PARAMETER,
    FUSION_RULE_PARAMETER,
    IMAGE,
    IMAGE_ENCODER,
    IMAGE_PREPROCESS,
    PRODUCT_ENCODER,
    PRODUCT_SPACE_PARAMETER,
    QUERY,
    QUERY_ENCODER,
    QUERY_IMAGE_PREPROCESS,
    TITLE,
    model_name,
)

logger = logging.getLogger(__name__)

OUTPUT = EMBEDDING


class EncoderUnavailable(RuntimeError):
    """Triton cannot be reached, or a model is not ready. `short`: the one sentence of what is down (the page's
    answer); the message adds what to do."""

    def __init__(self, message: str, short: str = ""):
        super().__init__(message)
        self.short = short or message


class EncoderFault(EncoderUnavailable):
    """Triton answered with a failure of its own (a crashed model stub, an ONNX Runtime error).

    Not the input's fault: callers retry it like an outage and then stop loudly, never treat the
    product as a bad image (that would silently re-embed a whole catalog text-only).
    """


class EncodingError(ValueError):
    """Triton refused one request as invalid input (bad image, empty query...): the message says why."""


class _Corrupted(Exception):
    """Triton 2.51 answered a well-formed request as if it held other bytes (see CORRUPTED)."""


# How Triton says "the caller's input is invalid" (TRITONSERVER_ERROR_INVALID_ARG) on each protocol;
# the Python models answer bad input with TritonError.INVALID_ARG. Every other status is a server fault.
INVALID_INPUT_STATUS = {"grpc": ("StatusCode.INVALID_ARGUMENT",), "http": ("400",)}
# Triton 2.51's Python backend (the nvidia-pytriton 0.7.0 binary), after an ensemble request failed in one
# step (a photo it could not decode) while another step of it still ran, now and then answers later
# well-formed requests as if they held other bytes: "unexpected number of string elements", "incomplete
# string data", even "bad image" for a photo that decodes. bench/triton_strings.py reproduces it with
# tritonclient alone (results: bench/results/triton_strings.md). Two defences: photos are decoded here
# first, with the code the Triton models run (core.preprocess), so our own traffic never fails a step;
# and on an affected server, such an answer to a request whose photos decoded is sent again (RESENDS
# times at most), each resend counted (resends(): mmsearch_triton_resends_total on the page's /metrics).
AFFECTED_VERSIONS = ("2.51.",)
CORRUPTED = ("number of string elements", "incomplete string data", "bad image")
RESENDS = 2
_resends = [0]
_resends_lock = threading.Lock()


def resends() -> int:
    """Requests this process sent again because an affected Triton corrupted them."""
    return _resends[0]


def _reason(exc: BaseException) -> str:
    """Why a call to Triton failed, in words (a timeout, a refused connection), not a class name."""
    text = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    text = text or str(exc)
    if "deadline" in text.lower() or isinstance(exc, TimeoutError) or "timed out" in text.lower():
        return "no answer within the deadline"
    if "connect" in text.lower() or isinstance(exc, ConnectionError):
        return "connection refused or lost"
    return text.splitlines()[0][:200] if text else "no reason given"


def protocol_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
    return module


class TritonEncoder:
    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", timeout_s: float = SEARCH_TIMEOUT_S,
                 tag: str = ""):
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self.tag = tag  # which model set: the ensembles' served names are model_name(QUERY_ENCODER, tag)...
        model_name(QUERY_ENCODER, tag)  # a malformed tag fails here, not on the first request
        self.module = protocol_module(protocol)
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        self.client = self.module.InferenceServerClient(url, **kwargs)
        # Every gRPC call carries a deadline (HTTP's are the connection's timeouts above).
        self._deadline = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        self._metadata: dict[str, dict] = {}

    def _unavailable(self, what: str) -> EncoderUnavailable:
        short = f"{what} at {self.protocol}://{self.url}"
        return EncoderUnavailable(
            f"{short}. Start the server with `python -m export.serve --model-repository model_repository` (or "
            "`make demo`), or pass --triton-url / --protocol to reach yours.", short)

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
            raise self._unavailable(f"Triton did not answer ({_reason(exc)})") from None
        if not live:
            raise self._unavailable("Triton is not live")
        for model in map(self.served, models):
            try:
                ready = self.client.is_model_ready(model, **self._deadline)
            except Exception as exc:
                raise self._unavailable(f"Triton did not answer for model {model!r} ({_reason(exc)})") from None
            if not ready:
                raise self._unavailable(f"model {model!r} is not ready")

    def metadata(self, model: str) -> dict:
        model = self.served(model)
        if model not in self._metadata:
            try:
                extra = {"as_json": True, **self._deadline} if self.protocol == "grpc" else {}
                meta = self.client.get_model_metadata(model, **extra)
            except Exception as exc:
                raise self._unavailable(f"no metadata for model {model!r} ({_reason(exc)})") from None
            self._metadata[model] = meta
        return self._metadata[model]

    def input_names(self, model: str) -> list[str]:
        return [t["name"] for t in self.metadata(model)["inputs"]]

    @property
    def embed_dim(self) -> int:
        output = next(t for t in self.metadata(QUERY_ENCODER)["outputs"] if t["name"] == OUTPUT)
        return int(output["shape"][-1])

    def _parameters(self) -> dict:
        if "parameters" not in self._metadata:
            try:
                config = self.client.get_model_config(self.served(QUERY_ENCODER), **(
                    {"as_json": True, **self._deadline} if self.protocol == "grpc" else {}))
            except Exception as exc:
                model = self.served(QUERY_ENCODER)
                raise self._unavailable(f"no config for model {model!r} ({_reason(exc)})") from None
            config = config.get("config", config)  # gRPC wraps it, HTTP does not
            self._metadata["parameters"] = {k: v.get("string_value", "")
                                            for k, v in config.get("parameters", {}).items()}
        return self._metadata["parameters"]

    @property
    def fingerprint(self) -> str:
        """Which weights and graph variant Triton serves (export's "fingerprint" config parameter)."""
        return self._parameters().get(FINGERPRINT_PARAMETER) or "unknown"  # exported before fingerprints: unknown

    @property
    def product_space(self) -> str:
        """The model whose product vectors this set's queries are embedded against (export's "product_space"
        parameter): its own fingerprint, or the base model's for a query tower trained on its own (a
        query-side model set, training/from_judgments.py)."""
        return self._parameters().get(PRODUCT_SPACE_PARAMETER) or self.fingerprint

    @property
    def fusion_rule(self) -> FusionRule | None:
        """This model set's hybrid fusion rule (export's "fusion_rule" parameter; None: the shipped rule)."""
        value = self._parameters().get(FUSION_RULE_PARAMETER)
        return FusionRule.from_json(value) if value else None

    @property
    def ranking_model(self) -> str:
        """What ranks this set's searches: its fingerprint and its fusion rule (core.fusion_rule.ranking_model)."""
        return ranking_model(self.fingerprint, self.fusion_rule)

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
            except _Corrupted as exc:
                if resend == RESENDS and "bad image" in str(exc):  # every time: Triton's own decoder disagrees
                    raise EncodingError(str(exc)) from None
                if resend == RESENDS:
                    raise EncoderFault(f"Triton's {model} kept answering a well-formed request as if it held other "
                                       f"bytes ({exc}): restart Triton") from None
                with _resends_lock:
                    _resends[0] += 1
                logger.warning("Triton's %s corrupted a well-formed request (%s): sending it again", model, exc)

    def _affected(self) -> bool:
        """Whether the server is a version with the corruption CORRUPTED describes (asked once)."""
        if "version" not in self._metadata:
            try:
                meta = self.client.get_server_metadata(**({"as_json": True, **self._deadline}
                                                          if self.protocol == "grpc" else {}))
            except Exception as exc:
                raise self._unavailable(f"Triton did not answer ({_reason(exc)})") from None
            self._metadata["version"] = str(meta.get("version", ""))
        return self._metadata["version"].startswith(AFFECTED_VERSIONS)

    def _infer_once(self, model: str, tensors: list, outputs: list) -> np.ndarray:
        try:
            result = self.client.infer(model, tensors, outputs=outputs, **self._deadline)
        except self.module.InferenceServerException as exc:
            message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
            status = str(exc.status() or "")
            if status in INVALID_INPUT_STATUS[self.protocol]:
                # Every photo sent was decoded first: a refusal of the bytes is the affected server's corruption.
                if any(s in message for s in CORRUPTED) and self._affected():
                    raise _Corrupted(message) from None
                raise EncodingError(message) from None
            if any(s in status for s in ("UNAVAILABLE", "DEADLINE", "503")) or "connect" in message.lower():
                raise self._unavailable(f"Triton did not answer ({_reason(exc)})") from None
            raise EncoderFault(
                f"Triton's {model} failed on the server ({status or 'no status'}: {message}). This is not the "
                "input's fault: read the Triton log (runs/triton.log with `python -m export.serve`), fix or "
                "re-export the model repository, restart Triton and run again.") from None
        except Exception as exc:  # connection refused, reset, timeout
            raise self._unavailable(f"Triton request failed ({_reason(exc)})") from None
        return result.as_numpy(OUTPUT)

    def _image_limits(self, preprocess: str) -> tuple[int, int]:
        """(max pixels, max bytes) of a photo, as the served preprocess model's config sets them."""
        key = f"limits:{preprocess}"
        if key not in self._metadata:
            try:
                config = self.client.get_model_config(self.served(preprocess), **(
                    {"as_json": True, **self._deadline} if self.protocol == "grpc" else {}))
            except Exception as exc:
                raise self._unavailable(f"no config for model {self.served(preprocess)!r} ({_reason(exc)})") from None
            params = config.get("config", config).get("parameters", {})
            try:
                self._metadata[key] = (int(params["max_pixels"]["string_value"]),
                                       int(params["max_bytes"]["string_value"]))
            except (KeyError, TypeError, ValueError):  # an older repository: Triton checks with its own limits
                self._metadata[key] = (DEFAULT_MAX_PIXELS, 0)
        return self._metadata[key]

    def check_image(self, data: bytes, preprocess: str = IMAGE_PREPROCESS) -> None:
        """Refuse (EncodingError) a photo the served model would refuse, before it reaches Triton."""
        max_pixels, max_bytes = self._image_limits(preprocess)
        if max_bytes and len(data) > max_bytes:
            raise EncodingError(f"bad image: image of {len(data):,} bytes exceeds the limit of {max_bytes:,}")
        try:
            decode_image(data, max_pixels)
        except ImageError as exc:
            raise EncodingError(f"bad image: {exc}") from None

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
        """Product embeddings; an image of None or b"" is a product without a photo. A photo the model would
        refuse raises EncodingError before anything is sent."""
        inputs = {TITLE: list(titles), DESCRIPTION: list(descriptions)}
        if self.multimodal:
            inputs[IMAGE] = [img or b"" for img in (images if images is not None else [None] * len(titles))]
            for img in inputs[IMAGE]:
                if img:
                    self.check_image(img)
        return self.infer(PRODUCT_ENCODER, inputs)

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        if not self.multimodal:
            raise EncodingError("the served model is text-only: it has no image encoder")
        if any(not img for img in images):
            raise EncodingError("empty image")
        for img in images:
            self.check_image(img, QUERY_IMAGE_PREPROCESS)
        return self.infer(IMAGE_ENCODER, {IMAGE: list(images)})
