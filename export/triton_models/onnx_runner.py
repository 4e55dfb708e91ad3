"""Triton Python model that runs 1/model.onnx with ONNX Runtime: the CPU flavour of a tower.

The production flavour serves the same file with Triton's onnxruntime backend; this model exists
because that backend is not installable on the machines the project is developed on. Requests
that the dynamic batcher hands over together are run as one ONNX Runtime call.

A text tower may tokenize in this same process (parameters tokenizer_file, max_length,
text_inputs, as for tokenizer.py, copied beside as text_inputs.py): its inputs are then the texts
(QUERY, or TITLE and DESCRIPTION), and each batch is padded only to its longest text. On a CPU this
saves a Python-model hop per request (about 1 ms here) and the compute spent on padding tokens.
Parameters: intra_op_threads (0 = ONNX Runtime's default), allow_spinning ("0" stops idle worker
threads from busy-waiting, which on a small CPU steals cycles from the other models' processes).
"""

import json
import os
import sys

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "1"))
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]
        self.graph_outputs = [o.name for o in self.session.get_outputs()]
        self.text = None
        if "tokenizer_file" in params:
            sys.path.insert(0, here)
            import text_inputs

            self.tokenizing = text_inputs
            self.text = text_inputs.TextInputs(here, params, pad_to_longest=True)

    def _feed(self, requests):
        """(ONNX feed, rows per request, error per failed request) for the requests of one batch."""
        if self.text is not None:
            texts, sizes, errors = self.tokenizing.read_texts(self.text, requests)
            if not texts:
                return None, sizes, errors, texts
            ids, mask = self.text.encode(texts)
            return {"input_ids": ids, "attention_mask": mask}, sizes, errors, texts
        arrays = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name, _ in self.inputs]
                  for r in requests]
        feed = {name: np.concatenate([a[j] for a in arrays]).astype(dtype, copy=False)
                for j, (name, dtype) in enumerate(self.inputs)}
        return feed, [a[0].shape[0] for a in arrays], {}, None

    def execute(self, requests):
        try:
            feed, sizes, errors, texts = self._feed(requests)
            results = dict(zip(self.graph_outputs, self.session.run(self.graph_outputs, feed))) if feed else {}
        except Exception as exc:  # one bad request must not fail the others: retry one by one
            if len(requests) > 1:
                return [self.execute([r])[0] for r in requests]
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))]
        if texts is not None:
            results["text_mask"] = self.text.text_mask(texts)  # read by fusion when the model has one
        responses, start = [], 0
        for i, n in enumerate(sizes):
            if i in errors:
                responses.append(self.tokenizing.error_response(errors[i]))
                continue
            tensors = [pb_utils.Tensor(name, results[name][start:start + n].astype(dtype, copy=False))
                       for name, dtype in self.outputs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
