"""Triton Python model: text (BYTES) -> input_ids, attention_mask (INT64, fixed length).

One source for two models: `query_tokenizer` (input QUERY; an empty query is an error) and
`product_tokenizer` (inputs TITLE and DESCRIPTION, joined as in training; it also returns
text_mask = 0 for a product without text, which the fusion graph then embeds image-only).
Parameters (config.pbtxt): tokenizer_file, max_length, text_inputs (comma-separated input names).

`TextInputs` is also what the CPU flavour's towers (onnx_runner.py) use to tokenize in their own
process, with the same parameters.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class RequestError(ValueError):
    """A request's text is unusable; only that request fails."""


class TextInputs:
    """Reads a request's text inputs and tokenizes them as in training."""

    def __init__(self, here: str, params: dict, pad_to_longest: bool = False):
        sys.path.insert(0, here)
        import preprocess  # core/preprocess.py, copied here by export

        self.pre = preprocess
        self.names = params["text_inputs"].split(",")
        max_length = int(params["max_length"])
        self.tokenizer = preprocess.load_tokenizer(os.path.join(here, params["tokenizer_file"]), max_length,
                                                   pad_to_longest=pad_to_longest)
        # Only the first max_length tokens count: cut absurdly long strings before tokenizing.
        self.max_chars = max_length * 64
        self.product = len(self.names) > 1

    def texts(self, request) -> list[str]:
        columns = []
        for name in self.names:
            values = pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)
            try:
                columns.append([v.decode("utf-8", errors="strict")[: self.max_chars]
                                if isinstance(v, bytes) else str(v)[: self.max_chars] for v in values])
            except UnicodeDecodeError as exc:
                raise RequestError(f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not self.product:
            if any(not t.strip() for t in columns[0]):
                raise RequestError("empty query: send at least one non-space character")
            return columns[0]
        return [self.pre.product_text(*fields) for fields in zip(*columns)]

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pre.tokenize(self.tokenizer, texts)

    @staticmethod
    def text_mask(texts: list[str]) -> np.ndarray:
        """1 for a product with text, 0 for one without (fusion then embeds it image-only)."""
        return np.asarray([[1.0 if t else 0.0] for t in texts], dtype=np.float32)


def read_texts(text_inputs: TextInputs, requests) -> tuple[list[str], list[int], dict[int, str]]:
    """All requests' texts in order, how many each request has, and the error of each failed request."""
    texts, counts, errors = [], [], {}
    for i, request in enumerate(requests):
        try:
            batch = text_inputs.texts(request)
        except RequestError as exc:
            errors[i], batch = str(exc), []
        texts.extend(batch)
        counts.append(len(batch))
    return texts, counts, errors


def error_response(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.text = TextInputs(os.path.join(args["model_repository"], args["model_version"]), params)
        self.with_text_mask = "text_mask" in {o["name"] for o in config["output"]}
        self.ids_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, "input_ids")["data_type"])

    def execute(self, requests):
        texts, counts, errors = read_texts(self.text, requests)
        ids, mask = self.text.encode(texts) if texts else (None, None)
        responses, start = [], 0
        for i, n in enumerate(counts):
            if i in errors:
                responses.append(error_response(errors[i]))
                continue
            out = [pb_utils.Tensor("input_ids", ids[start:start + n].astype(self.ids_dtype)),
                   pb_utils.Tensor("attention_mask", mask[start:start + n].astype(self.ids_dtype))]
            if self.with_text_mask:
                out.append(pb_utils.Tensor("text_mask", self.text.text_mask(texts[start:start + n])))
            responses.append(pb_utils.InferenceResponse(output_tensors=out))
            start += n
        return responses
