"""Static checks of a generated model repository, without a server (and without a GPU).

Every config.pbtxt must parse as a Triton ModelConfig, be named after its folder, and state its
backend/platform, batch size and instances; every ONNX graph's I/O must be what its config says;
every ensemble step must name an existing model, existing tensors with the same dtype and dims.

    python -m export.validate model_repository
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from core.specs import ATTENTION_MASK, INPUT_IDS, TEXT_MASK

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64",
                  onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT32: "TYPE_INT32"}


def load_configs(repo: Path) -> dict[str, model_config_pb2.ModelConfig]:
    configs = {}
    for path in sorted(Path(repo).glob("*/config.pbtxt")):
        configs[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return configs


def _dtype(t) -> str:
    return model_config_pb2.DataType.Name(t.data_type)


def validate_repository(repo: Path) -> list[str]:
    """All problems found (an empty list means the repository is consistent)."""
    repo = Path(repo)
    problems = []
    configs = load_configs(repo)
    if not configs:
        return [f"{repo}: no */config.pbtxt found"]
    for name, cfg in configs.items():
        if cfg.name != name:
            problems.append(f"{name}: config name {cfg.name!r} differs from its folder")
        if not (cfg.backend or cfg.platform):
            problems.append(f"{name}: neither backend nor platform is set")
        if cfg.max_batch_size <= 0:
            problems.append(f"{name}: max_batch_size must be set (> 0) for batching")
        if not (repo / name / "1").is_dir():
            problems.append(f"{name}: no version folder 1/")
        if cfg.platform != "ensemble" and not cfg.instance_group:
            problems.append(f"{name}: no instance_group")
        onnx_file = repo / name / "1" / "model.onnx"
        if onnx_file.exists():
            problems += _check_onnx(name, cfg, onnx_file)
        elif cfg.platform == "onnxruntime_onnx":
            problems.append(f"{name}: platform onnxruntime_onnx but no 1/model.onnx")
        if cfg.platform == "tensorrt_plan" and not any((repo / name / "1" / f).exists()
                                                       for f in ("model.plan", "model.onnx")):
            problems.append(f"{name}: tensorrt_plan with neither 1/model.plan nor its source 1/model.onnx")
        if cfg.backend == "python" and not (repo / name / "1" / "model.py").exists():
            problems.append(f"{name}: python backend without 1/model.py")
        if "tokenizer_file" in cfg.parameters:
            tokenizer = repo / name / "1" / cfg.parameters["tokenizer_file"].string_value
            if not tokenizer.exists():
                problems.append(f"{name}: tokenizer file {tokenizer.name} missing from 1/")
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            problems += _check_ensemble(name, cfg, configs)
    return problems


TOKENIZED = (INPUT_IDS, ATTENTION_MASK)  # a text graph's inputs
TOKENIZER_OUTPUTS = (TEXT_MASK,)  # what a tokenizing tower adds to its graph's outputs


def _check_tokenizing(name: str, cfg, graph) -> list[str]:
    """A tower that tokenizes its own text inputs (python flavour): texts in, the graph's outputs out."""
    problems = []
    texts = cfg.parameters["text_inputs"].string_value.split(",")
    if sorted(t.name for t in cfg.input) != sorted(texts):
        problems.append(f"{name}: config inputs {sorted(t.name for t in cfg.input)} != text_inputs {sorted(texts)}")
    if any(_dtype(t) != "TYPE_STRING" for t in cfg.input):
        problems.append(f"{name}: a tokenizing tower's inputs must be TYPE_STRING")
    if sorted(t.name for t in graph.input) != sorted(TOKENIZED):
        problems.append(f"{name}: tokenizes its inputs but the ONNX graph takes {[t.name for t in graph.input]}")
    extra = {t.name for t in cfg.output} - {t.name for t in graph.output} - set(TOKENIZER_OUTPUTS)
    missing = {t.name for t in graph.output} - {t.name for t in cfg.output}
    if extra or missing:
        problems.append(f"{name}: config outputs {sorted(t.name for t in cfg.output)} do not fit ONNX "
                        f"{sorted(t.name for t in graph.output)}")
    return problems


def _check_onnx(name: str, cfg, path: Path) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    if "tokenizer_file" in cfg.parameters:
        return _check_tokenizing(name, cfg, graph)
    problems = []
    for kind, declared, actual in (("input", cfg.input, graph.input), ("output", cfg.output, graph.output)):
        onnx_io = {t.name: t for t in actual}
        if sorted(onnx_io) != sorted(t.name for t in declared):
            problems.append(f"{name}: config {kind}s {sorted(t.name for t in declared)} != ONNX {sorted(onnx_io)}")
            continue
        for t in declared:
            tensor_type = onnx_io[t.name].type.tensor_type
            if ONNX_TO_TRITON.get(tensor_type.elem_type) != _dtype(t):
                problems.append(f"{name}: {t.name} is {_dtype(t)} in the config, not in the ONNX graph")
            onnx_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim][1:]
            if len(onnx_dims) != len(t.dims) or any(a != b and a != -1 for a, b in zip(onnx_dims, t.dims)):
                problems.append(f"{name}: {t.name} dims {list(t.dims)} do not fit ONNX {onnx_dims}")
    return problems


def _check_ensemble(name: str, cfg, configs: dict) -> list[str]:
    problems = []
    produced = {t.name: t for t in cfg.input}  # ensemble tensor name -> spec
    for step in cfg.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"{name}: step model {step.model_name!r} does not exist")
            continue
        inputs = {t.name: t for t in model.input}
        outputs = {t.name: t for t in model.output}
        for key, value in step.input_map.items():
            if key not in inputs:
                problems.append(f"{name}: {step.model_name} has no input {key!r}")
            elif value not in produced:
                problems.append(f"{name}: tensor {value!r} is used before any step produces it")
            elif _dtype(produced[value]) != _dtype(inputs[key]):
                problems.append(f"{name}: {value} is {_dtype(produced[value])}, "
                                f"{step.model_name}.{key} wants {_dtype(inputs[key])}")
            elif list(produced[value].dims) != list(inputs[key].dims) and -1 not in inputs[key].dims:
                problems.append(f"{name}: {value} dims {list(produced[value].dims)} != "
                                f"{step.model_name}.{key} {list(inputs[key].dims)}")
        missing = set(inputs) - set(step.input_map) - {t.name for t in model.input if t.optional}
        if missing:
            problems.append(f"{name}: {step.model_name} inputs {sorted(missing)} are not mapped")
        for key, value in step.output_map.items():
            if key not in outputs:
                problems.append(f"{name}: {step.model_name} has no output {key!r}")
            else:
                produced[value] = outputs[key]
        if model.max_batch_size < cfg.max_batch_size:
            problems.append(f"{name}: max_batch_size {cfg.max_batch_size} > {step.model_name}'s {model.max_batch_size}")
    for out in cfg.output:
        if out.name not in produced:
            problems.append(f"{name}: output {out.name!r} is produced by no step")
        elif list(produced[out.name].dims) != list(out.dims) or _dtype(produced[out.name]) != _dtype(out):
            problems.append(f"{name}: output {out.name} does not match the step that produces it")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path, help="model repository to check")
    args = parser.parse_args(argv)
    problems = validate_repository(args.repository)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{args.repository}: {len(load_configs(args.repository))} models, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
