"""Triton Python model: text (BYTES) -> input_ids, attention_mask (INT64, fixed length).

One source for two models: `query_tokenizer` (input QUERY; an empty query is an error) and
`product_tokenizer` (inputs TITLE and DESCRIPTION, joined as in training; it also returns
text_mask = 0 for a product without text, which the fusion graph then embeds image-only).
Parameters (config.pbtxt): tokenizer_file, max_length, text_inputs (comma-separated input names).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, here)
        import preprocess  # training/preprocess.py, copied here by export

        self.pre = preprocess
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_length = int(params["max_length"])
        self.inputs = params["text_inputs"].split(",")
        self.tokenizer = preprocess.load_tokenizer(os.path.join(here, params["tokenizer_file"]), self.max_length)
        # Only the first max_length tokens count: cut absurdly long strings before tokenizing.
        self.max_chars = self.max_length * 64
        outputs = {o["name"] for o in config["output"]}
        self.with_text_mask = "text_mask" in outputs
        self.ids_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, "input_ids")["data_type"])

    def _texts(self, request):
        columns = []
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            values = tensor.as_numpy().reshape(-1)
            columns.append([v.decode("utf-8", errors="strict")[: self.max_chars]
                            if isinstance(v, bytes) else str(v)[: self.max_chars] for v in values])
        if len(columns) == 1:
            texts = columns[0]
            if not self.with_text_mask and any(not t.strip() for t in texts):
                raise ValueError("empty query: send at least one non-space character")
            return texts
        return [self.pre.product_text(*fields) for fields in zip(*columns)]

    def execute(self, requests):
        texts, counts, errors = [], [], {}
        for i, request in enumerate(requests):
            try:
                batch = self._texts(request)
            except UnicodeDecodeError as exc:
                errors[i], batch = f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})", []
            except ValueError as exc:
                errors[i], batch = str(exc), []
            texts.extend(batch)
            counts.append(len(batch))
        ids, mask = self.pre.tokenize(self.tokenizer, texts) if texts else (None, None)
        responses, start = [], 0
        for i, n in enumerate(counts):
            if i in errors:
                error = pb_utils.TritonError(errors[i], pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            out = [pb_utils.Tensor("input_ids", ids[start:start + n].astype(self.ids_dtype)),
                   pb_utils.Tensor("attention_mask", mask[start:start + n].astype(self.ids_dtype))]
            if self.with_text_mask:
                present = np.asarray([[1.0 if t else 0.0] for t in texts[start:start + n]], dtype=np.float32)
                out.append(pb_utils.Tensor("text_mask", present))
            responses.append(pb_utils.InferenceResponse(output_tensors=out))
            start += n
        return responses
