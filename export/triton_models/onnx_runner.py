"""Triton Python model that runs 1/model.onnx with ONNX Runtime: the CPU flavour of a tower.

The production flavour serves the same file with Triton's onnxruntime backend; this model exists
because that backend is not installable on the machines the project is developed on. Requests
that the dynamic batcher hands over together are run as one ONNX Runtime call.
Parameters: intra_op_threads (0 = ONNX Runtime's default), allow_spinning ("0" stops idle worker
threads from busy-waiting, which on a small CPU steals cycles from the other models' processes).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "1"))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def execute(self, requests):
        arrays = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name, _ in self.inputs]
                  for r in requests]
        sizes = [a[0].shape[0] for a in arrays]
        try:
            feed = {name: np.concatenate([a[j] for a in arrays]).astype(dtype, copy=False)
                    for j, (name, dtype) in enumerate(self.inputs)}
            results = self.session.run([name for name, _ in self.outputs], feed)
        except Exception as exc:  # one bad request must not fail the others: retry one by one
            if len(requests) > 1:
                return [self.execute([r])[0] for r in requests]
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))]
        responses, start = [], 0
        for n in sizes:
            tensors = [pb_utils.Tensor(name, result[start:start + n].astype(dtype, copy=False))
                       for (name, dtype), result in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
