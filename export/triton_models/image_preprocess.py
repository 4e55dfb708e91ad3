"""Triton Python model: encoded image (BYTES: JPEG/PNG/WebP...) -> pixel_values (FP32, 3xSxS), image_mask.

Resize and normalization are core/preprocess.py itself, copied here by export, with the
checkpoint's preprocess_cfg. An undecodable, oversized or (where not allowed) empty image is an
error for its own request only; the other requests of the batch are served.
Parameters: preprocess_cfg (JSON), max_pixels, max_bytes, allow_missing ("true": an empty image
gives zeros and image_mask 0, i.e. a product without a photo).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        sys.path.insert(0, os.path.join(args["model_repository"], args["model_version"]))
        import preprocess

        self.pre = preprocess
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.cfg = json.loads(params["preprocess_cfg"])
        self.max_pixels = int(params["max_pixels"])
        self.max_bytes = int(params["max_bytes"])
        self.allow_missing = params.get("allow_missing", "false") == "true"
        size = int(self.cfg["image_size"])
        self.empty = np.zeros((3, size, size), dtype=np.float32)
        # Tensor names come from the config export wrote (core.specs): none is typed here.
        self.input = config["input"][0]["name"]
        self.pixels = config["output"][0]["name"]
        self.mask = config["output"][1]["name"] if len(config["output"]) > 1 else None

    def _pixels(self, data):
        if not data:
            if self.allow_missing:
                return self.empty, 0.0
            raise self.pre.ImageError("empty image")
        if len(data) > self.max_bytes:
            raise self.pre.ImageError(f"image of {len(data):,} bytes exceeds the limit of {self.max_bytes:,}")
        return self.pre.image_to_pixels(data, self.cfg, self.max_pixels), 1.0

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy().reshape(-1)
            try:
                results = [self._pixels(bytes(b) if b is not None else b"") for b in images]
            except self.pre.ImageError as exc:
                error = pb_utils.TritonError(f"bad image: {exc}", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            out = [pb_utils.Tensor(self.pixels, np.stack([p for p, _ in results]))]
            if self.mask is not None:
                out.append(pb_utils.Tensor(self.mask, np.asarray([[m] for _, m in results], dtype=np.float32)))
            responses.append(pb_utils.InferenceResponse(output_tensors=out))
        return responses
