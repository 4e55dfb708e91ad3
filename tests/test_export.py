import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from core.specs import REPORT_FILE
from export.__main__ import choose_variant
from export.graphs import graph_specs
from export.parity import FP32_TOLERANCE
from export.repository import ServingCfg, write_repository
from export.validate import load_configs, validate_repository
from export.variants import QUALITY_BOUND
from tests.conftest import graphs_dir
from training.factory import get_model_config


def test_fp32_graphs_match_pytorch_on_real_rows(tiny_repository):
    report = json.loads((tiny_repository / REPORT_FILE).read_text())
    assert set(report["parity_fp32"]) == {"query_tower", "text_tower", "image_tower", "fusion", "image_query_head"}
    for name, parity in report["parity_fp32"].items():
        assert parity["max_abs"] <= FP32_TOLERANCE["max_abs"], name
        assert parity["min_cosine"] >= FP32_TOLERANCE["min_cosine"], name
    variants = report["variants"]
    assert variants["fp32"]["mean_cosine"] > 0.9999 and variants["fp32"]["top10_overlap"] > 0.99
    assert variants["optimized"]["mean_cosine"] > 0.9999
    for name in ("fp32", "optimized"):  # the photo-query path too, end to end against PyTorch
        assert variants[name]["image_mean_cosine"] > 0.9999, name
    int8 = variants["int8"]
    assert int8["mean_cosine"] < variants["optimized"]["mean_cosine"]  # measured, and lossy
    # The bound the README states is the one export applies: INT8 serves on CPU only when it holds.
    assert QUALITY_BOUND["mean_cosine"] >= 0.99
    assert int8["meets_bound"] == all(int8[k] >= v for k, v in QUALITY_BOUND.items())
    assert choose_variant("auto", "python", report) == ("int8" if int8["meets_bound"] else "optimized")
    assert choose_variant("auto", "onnxruntime", report) == "fp32"  # GPU flavours: TensorRT takes FP32 graphs


def test_graphs_have_named_io_and_dynamic_batch_and_sequence_axes(tiny_repository):
    graph = onnx.load(str(graphs_dir(tiny_repository) / "fp32" / "query_tower.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["query_embedding"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_param == "sequence"
    image = onnx.load(str(graphs_dir(tiny_repository) / "fp32" / "image_tower.onnx"), load_external_data=False).graph
    assert image.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_repository_configs_match_the_onnx_graphs_and_ensembles_are_consistent(tiny_repository):
    assert validate_repository(tiny_repository) == []
    configs = load_configs(tiny_repository)
    assert {"query_encoder", "product_encoder", "image_encoder"} <= set(configs)
    embed_dim = get_model_config(json.loads((tiny_repository / REPORT_FILE).read_text())["checkpoint"]).embed_dim
    for name in ("query_encoder", "product_encoder", "image_encoder"):
        assert list(configs[name].output[0].dims) == [embed_dim]
    # CPU flavour: the text towers tokenize in their own process, so the ensembles have no tokenizer step.
    assert "query_tokenizer" not in configs and "product_tokenizer" not in configs
    query = configs["query_tower"]
    assert query.instance_group[0].kind == query.instance_group[0].KIND_CPU
    assert [t.name for t in query.input] == ["QUERY"]
    assert int(query.parameters["max_length"].string_value) == 16
    assert [t.name for t in configs["text_tower"].input] == ["TITLE", "DESCRIPTION"]
    assert {t.name for t in configs["text_tower"].output} == {"text_embedding", "text_mask"}
    assert [s.model_name for s in configs["query_encoder"].ensemble_scheduling.step] == ["query_tower"]
    assert configs["text_tower"].dynamic_batching.max_queue_delay_microseconds > 0


def test_validation_catches_a_tokenizing_tower_fed_the_wrong_inputs(tiny_repository, tmp_path):
    import shutil

    repo = tmp_path / "broken"
    shutil.copytree(tiny_repository, repo)
    config = repo / "query_tower" / "config.pbtxt"
    config.write_text(config.read_text().replace('"QUERY"', '"Q"', 1))
    (repo / "text_tower" / "1" / "tokenizer.json").unlink()
    problems = validate_repository(repo)
    assert any("query_tower" in p and "text_inputs" in p for p in problems), problems
    assert any("text_tower" in p and "tokenizer.json" in p for p in problems), problems


def test_gpu_flavour_uses_onnxruntime_with_tensorrt_and_validates(tiny_checkpoint, tiny_repository, tmp_path):
    report = json.loads((tiny_checkpoint / "config.json").read_text())
    specs = graph_specs(get_model_config(tiny_checkpoint), report["preprocess_cfg"]["image"]["image_size"])
    repo = tmp_path / "gpu_repository"
    write_repository(repo, tiny_checkpoint, specs, graphs_dir(tiny_repository) / "fp32", "onnxruntime", ServingCfg())
    assert validate_repository(repo) == []
    tower = load_configs(repo)["text_tower"]
    assert tower.platform == "onnxruntime_onnx"
    assert tower.instance_group[0].kind == tower.instance_group[0].KIND_GPU
    accelerator = tower.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    configs = load_configs(repo)
    assert configs["query_tokenizer"].backend == "python"  # GPU towers take token ids from a tokenizer step
    assert [s.model_name for s in configs["query_encoder"].ensemble_scheduling.step] == ["query_tokenizer",
                                                                                          "query_tower"]


def test_validation_catches_a_renamed_tensor(tiny_repository, tmp_path):
    import shutil

    repo = tmp_path / "broken"
    shutil.copytree(tiny_repository, repo)
    config = repo / "fusion" / "config.pbtxt"
    config.write_text(config.read_text().replace('"image_mask"', '"img_mask"'))
    problems = validate_repository(repo)
    assert any("fusion" in p and "img_mask" in p for p in problems), problems


def test_tokenizer_used_by_triton_matches_the_training_tokenizer(tiny_checkpoint):
    from core.preprocess import load_tokenizer, tokenize
    from training.factory import create_tokenizer

    texts = ["Puma Men's Black T-shirt", "", "a " * 100]
    ids, mask = tokenize(load_tokenizer(str(tiny_checkpoint / "tokenizer" / "tokenizer.json"), 16), texts)
    hf = create_tokenizer(tiny_checkpoint)(texts, padding="max_length", truncation=True, max_length=16)
    np.testing.assert_array_equal(ids, np.asarray(hf["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(hf["attention_mask"]))
    # The CPU flavour pads each batch only to its longest text: the same ids, cut after the longest.
    short, short_mask = tokenize(load_tokenizer(str(tiny_checkpoint / "tokenizer" / "tokenizer.json"), 16,
                                                pad_to_longest=True), texts[:2])
    assert short.shape[1] == int(mask[0].sum()) < 16
    np.testing.assert_array_equal(short, ids[:2, : short.shape[1]])
    np.testing.assert_array_equal(short_mask, mask[:2, : short.shape[1]])


@pytest.mark.parametrize("flag", ["--checkpoint", "--backend", "--variant", "--parity-rows", "--intra-op-threads"])
def test_export_cli_documents_its_flags(flag, capsys):
    from export.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert flag in capsys.readouterr().out


def test_gpu_bench_prepares_and_runs_on_the_cpu_provider(tiny_checkpoint, tiny_repository, catalog_path, tmp_path):
    """bench/gpu.py end to end where no GPU is: packed graphs and the reference agree, rows are written."""
    import subprocess
    import sys

    script = str(Path(__file__).resolve().parents[1] / "bench" / "gpu.py")
    subprocess.run([sys.executable, script, "prepare", "--checkpoint", str(tiny_checkpoint), "--graphs-root",
                    str(graphs_dir(tiny_repository).parent), "--catalog", str(catalog_path), "--queries", "24",
                    "--products", "24", "--out", str(tmp_path / "bundle")], check=True, capture_output=True)
    subprocess.run([sys.executable, script, "run", "--bundle", str(tmp_path / "bundle"), "--out", str(tmp_path / "out"),
                    "--configs", "cpu:fp32,cuda:fp32", "--no-isolate", "--latency-runs", "5", "--warmup", "1",
                    "--batches", "8", "--min-seconds", "0.1", "--warmup-batches", "1"], check=True, capture_output=True)
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    cpu = result["configs"]["cpu:fp32"]
    assert all(cpu["parity"][k]["cos_min"] > 0.99999 for k in cpu["parity"] if k != "top10_overlap")
    assert cpu["parity"]["top10_overlap"] == 1.0 and cpu["query_latency"]["run"]["p50_ms"] > 0
    assert "CUDAExecutionProvider" in result["configs"]["cuda:fp32"]["error"]  # said, not silently run on the CPU
    assert "| cpu:fp32 | run |" in (tmp_path / "out" / "gpu.md").read_text()
