"""deploy/ checked without a cluster: core kinds against Kubernetes' JSON schemas (kubernetes-validate), the KEDA
ScaledObject against KEDA's CRD, our Milvus values against the chart's values.yaml, every flag against the
command's own parser, and what compose runs against what the cluster runs. Each check is also shown to reject
a broken copy, so none of them passes by construction."""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKER = REPO / "docker"
DATA = Path(__file__).resolve().parent / "data" / "deploy"
# KEDA 2.20.2 (the CRD in tests/data/deploy) builds against k8s.io/api v0.35: validate against that release.
K8S_VERSION = "1.35"
SECRET = "mmsearch-secrets"
SECRET_ENV = re.compile(r"PASSWORD|TOKEN|SECRET|KEY", re.IGNORECASE)
SECRET_FLAGS = ("--password", "--token", "--admin-key")
# The trigger metadata KEDA's prometheus scaler reads (pkg/scalers/prometheus_scaler.go at v2.20.2, its
# `keda:"name=..."` tags; authentication aside); it ignores any other key, so a typo would pass the CRD.
PROMETHEUS_SCALER_KEYS = {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
                          "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout",
                          "identityOwner"}
CLIENT_SCRIPTS = {"client/app.py", "client/index.py", "client/upgrade.py"}


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


KUSTOMIZATION = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
NAMESPACE = KUSTOMIZATION["namespace"]
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name not in ("kustomization.yaml", "milvus-values.yaml"))
OBJECTS = [(p.relative_to(DEPLOY).as_posix(), obj) for p in MANIFESTS for obj in load_all(p)]
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
VALUES = yaml.safe_load((DEPLOY / "milvus-values.yaml").read_text())
CHART_VALUES = yaml.safe_load((DATA / "milvus-helm-values.yaml").read_text())
README = (DEPLOY / "README.md").read_text()


def resolve(text: str) -> str:
    """A compose string with each ${VAR:-default} as its default (what compose runs with nothing set)."""
    return re.sub(r"\$\{\w+(?::-([^}]*))?[^}]*\}", lambda m: m.group(1) or "", text)


def find(kind: str, name: str) -> dict:
    (obj,) = [o for _, o in OBJECTS if o["kind"] == kind and o["metadata"].get("name") == name]
    return obj


def pod_specs(obj: dict) -> list[dict]:
    """Every pod spec in an object, wherever its kind nests it (Deployment, Job, CronJob, Pod)."""
    found = []
    if isinstance(obj, dict):
        if "containers" in obj:
            found.append(obj)
        for value in obj.values():
            found += pod_specs(value)
    elif isinstance(obj, list):
        for value in obj:
            found += pod_specs(value)
    return found


def containers() -> list[tuple[str, dict]]:
    return [(f"{where}:{c['name']}", c) for where, obj in OBJECTS for spec in pod_specs(obj)
            for c in spec["containers"] + spec.get("initContainers", [])]


def container(kind: str, name: str) -> dict:
    (spec,) = pod_specs(find(kind, name))
    return spec["containers"][0]


def job(file: str) -> dict:
    (obj,) = load_all(DEPLOY / "jobs" / file)
    return obj


def flag_values(args: list[str]) -> dict[str, str | None]:
    return {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else None) for a in args if a.startswith("--")}


# -- layout -------------------------------------------------------------------------------------------------


def test_kustomization_lists_every_standing_manifest_and_no_one_shot_job():
    listed = set(KUSTOMIZATION["resources"])
    standing = {p.relative_to(DEPLOY).as_posix() for p in MANIFESTS if p.parent.name != "jobs"}
    assert listed == standing
    for path in sorted((DEPLOY / "jobs").glob("*.yaml")):  # created one run at a time, never by apply -k
        for obj in load_all(path):
            assert obj["kind"] in ("Job", "Pod"), path
            assert obj["kind"] == "Pod" or "generateName" in obj["metadata"], path  # each create a new run


def test_generated_configmaps_read_files_inside_deploy_and_the_dashboard_is_composes():
    for generator in KUSTOMIZATION["configMapGenerator"]:
        for entry in generator["files"]:
            path = DEPLOY / entry.split("=")[-1]
            # kustomize's default load restrictor: no file outside the kustomization root, symlinks resolved
            assert not path.is_symlink() and path.resolve().is_relative_to(DEPLOY.resolve()), entry
            assert path.is_file(), entry
    copied = DEPLOY / "monitoring" / "grafana-dashboard.json"
    assert copied.read_bytes() == (DOCKER / "monitoring" / "grafana-dashboard.json").read_bytes(), (
        "deploy/monitoring/grafana-dashboard.json differs from docker/monitoring/: copy the docker one over it")


# -- schemas ------------------------------------------------------------------------------------------------


def core_objects() -> list[tuple[str, dict]]:
    return [(where, obj) for where, obj in OBJECTS if not obj["apiVersion"].startswith("keda.sh/")]


def test_core_kinds_match_the_kubernetes_schema():
    assert {obj["kind"] for _, obj in core_objects()} >= {"Deployment", "Service", "Job", "CronJob",
                                                          "PersistentVolumeClaim", "Role", "Pod"}
    for where, obj in core_objects():
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where} {obj['kind']}: {e.message} at {list(e.path)}")


@pytest.mark.parametrize("typo", ["spec.replica", "probe.paht", "port.containerPrt"])
def test_the_kubernetes_schema_rejects_a_typo(typo):
    broken = copy.deepcopy(find("Deployment", "page"))
    c = broken["spec"]["template"]["spec"]["containers"][0]
    if typo == "spec.replica":
        broken["spec"]["replica"] = broken["spec"].pop("replicas")
    elif typo == "probe.paht":
        c["readinessProbe"]["httpGet"]["paht"] = c["readinessProbe"]["httpGet"].pop("path")
    else:
        c["ports"][0]["containerPrt"] = c["ports"][0].pop("containerPort")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def strict(schema):
    """The CRD schema with unknown fields refused, as the API server does under `kubectl apply`'s default
    field validation (Strict): every object with declared properties and no additionalProperties or
    x-kubernetes-preserve-unknown-fields of its own gets additionalProperties: false."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


KEDA_CRD = yaml.safe_load((DATA / "keda.sh_scaledobjects.yaml").read_text())


def keda_errors(obj: dict) -> list[str]:
    group, version = obj["apiVersion"].split("/")
    assert group == KEDA_CRD["spec"]["group"] and obj["kind"] == KEDA_CRD["spec"]["names"]["kind"]
    (served,) = [v for v in KEDA_CRD["spec"]["versions"] if v["name"] == version]
    validator = jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))
    return [f"{e.message} at {list(e.path)}" for e in validator.iter_errors(obj)]


def test_scaled_object_matches_kedas_crd_and_its_prometheus_scaler():
    (scaled,) = [obj for _, obj in OBJECTS if obj["kind"] == "ScaledObject"]
    assert keda_errors(scaled) == []
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        assert set(trigger["metadata"]) <= PROMETHEUS_SCALER_KEYS
        assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
        assert float(trigger["metadata"]["threshold"]) > 0
        assert trigger["metricType"] in ("Value", "AverageValue")


def test_kedas_crd_rejects_a_typo():
    (scaled,) = [obj for _, obj in OBJECTS if obj["kind"] == "ScaledObject"]
    broken = copy.deepcopy(scaled)
    broken["spec"]["minReplicas"] = broken["spec"].pop("minReplicaCount")
    assert any("minReplicas" in e for e in keda_errors(broken))
    broken = copy.deepcopy(scaled)
    del broken["spec"]["triggers"][0]["metadata"]
    assert any("metadata" in e for e in keda_errors(broken))


def test_the_autoscaler_reads_tritons_metrics_from_our_prometheus():
    (scaled,) = [obj for _, obj in OBJECTS if obj["kind"] == "ScaledObject"]
    target = find("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert target["metadata"]["name"] == "triton"
    assert "replicas" not in target["spec"]  # the autoscaler owns it: apply must not reset it
    assert scaled["spec"]["maxReplicaCount"] > scaled["spec"]["minReplicaCount"] >= 1
    jobs = {j["job_name"] for j in yaml.safe_load((DEPLOY / "monitoring" / "prometheus.yml").read_text())
            ["scrape_configs"]}
    service = find("Service", "prometheus")
    for trigger in scaled["spec"]["triggers"]:
        # KEDA's operator lives in its own namespace: only the full Service name reaches ours.
        assert trigger["metadata"]["serverAddress"] == \
            f"http://prometheus.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
        query = trigger["metadata"]["query"]
        assert set(re.findall(r'job="([^"]+)"', query)) <= jobs and "nv_inference_queue_duration_us" in query


# -- Milvus values ------------------------------------------------------------------------------------------


def unknown_keys(ours: dict, theirs: dict, path: str = "") -> list[str]:
    """Key paths of ours the chart's values.yaml does not have. A map the chart defaults to {} (resources,
    nodeSelector, annotations...) is free-form and taken whole; any other map is checked key by key, so a
    subchart key that the parent's values.yaml does not list is refused even where the subchart takes it."""
    wrong = []
    for key, value in ours.items():
        where = f"{path}.{key}" if path else key
        if key not in theirs:
            wrong.append(where)
        elif isinstance(value, dict) and theirs[key] != {}:
            if isinstance(theirs[key], dict):
                wrong += unknown_keys(value, theirs[key], where)
            else:
                wrong.append(f"{where} (a map where the chart has {theirs[key]!r})")
        elif not isinstance(value, dict) and isinstance(theirs[key], dict):
            wrong.append(f"{where} (a value where the chart has a map)")
    return wrong


def credentials(values, path: str = "") -> list[str]:
    found = []
    if isinstance(values, dict):
        for key, value in values.items():
            where = f"{path}.{key}" if path else key
            if re.search(r"password|secret|accesskey|token", key, re.IGNORECASE) and value not in ("", None):
                found.append(where)
            found += credentials(value, where)
    return found


def test_milvus_values_keys_exist_in_the_charts_values():
    assert unknown_keys(VALUES, CHART_VALUES) == []


def test_milvus_values_checker_rejects_typos_and_accepts_free_form_maps():
    assert unknown_keys({"queryNode": {"replica": 2}}, CHART_VALUES) == ["queryNode.replica"]
    assert unknown_keys({"clster": {"enabled": True}}, CHART_VALUES) == ["clster"]
    assert unknown_keys({"image": {"all": {"tga": "v1"}}}, CHART_VALUES) == ["image.all.tga"]
    assert unknown_keys({"cluster": True}, CHART_VALUES) == ["cluster (a value where the chart has a map)"]
    assert unknown_keys({"queryNode": {"resources": {"limits": {"memory": "1Gi"}}}}, CHART_VALUES) == []
    assert unknown_keys({"minio": {"resources": {"limits": {"memory": "1Gi"}}}}, CHART_VALUES) == \
        ["minio.resources.limits"]  # the chart's default there is not empty: checked key by key


def test_milvus_values_pin_composes_milvus_in_cluster_mode_with_its_auth():
    image = VALUES["image"]["all"]
    assert f"{image['repository']}:{image['tag']}" == SERVICES["milvus"]["image"]
    assert CHART_VALUES["image"]["all"]["tag"] == image["tag"]  # the chart copy is the one made for this Milvus
    assert VALUES["cluster"]["enabled"] is True
    assert VALUES["queryNode"]["replicas"] >= 2 and VALUES["queryNode"]["resources"]["requests"]
    user_yaml = yaml.safe_load(VALUES["extraConfigFiles"]["user.yaml"])
    assert user_yaml == yaml.safe_load((DOCKER / "milvus-user.yaml").read_text())
    assert credentials(VALUES) == [] and credentials(user_yaml) == []
    assert credentials({"minio": {"secretKey": "s3cret"}}) == ["minio.secretKey"]  # the check can fail


def test_helm_installs_the_chart_versions_the_schemas_came_from():
    recorded = (DATA / "README.md").read_text()
    chart = re.search(r"chart version (\d+\.\d+\.\d+)", recorded).group(1)
    mentions = re.findall(r"zilliztech/milvus --version (\S+)", README + (DEPLOY / "milvus-values.yaml").read_text())
    assert len(mentions) >= 2 and set(mentions) == {chart}
    keda = re.search(r"KEDA (v\d+\.\d+\.\d+)", recorded).group(1)
    assert set(re.findall(r"kedacore/keda --version (\S+)", README)) == {keda.removeprefix("v")}


# -- images, secrets, flags ---------------------------------------------------------------------------------


def pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_every_image_is_pinned_and_is_one_compose_runs():
    compose_images = {service["image"] for service in SERVICES.values()}
    for where, c in containers():
        assert pinned(c["image"]), f"{where}: {c['image']} is not pinned to a tag"
        assert c["image"] in compose_images, f"{where}: {c['image']} is not an image docker/compose.yaml runs"
    assert not pinned("mmsearch-client") and not pinned("prom/prometheus:latest")
    assert not pinned("registry:5000/mmsearch-client")  # a registry port is no tag


def secret_leaks(c: dict) -> list[str]:
    leaks = [e["name"] for e in c.get("env", []) if SECRET_ENV.search(e["name"]) and "secretKeyRef" not in
             e.get("valueFrom", {})]
    return leaks + [a for a in c.get("command", []) + c.get("args", []) if a.startswith(SECRET_FLAGS)]


def test_no_secret_is_written_in_a_manifest():
    assert not [where for where, obj in OBJECTS if obj["kind"] == "Secret"]  # made by kubectl create secret
    command = re.search(rf"create secret generic {SECRET}(.*?[^\\])\n", README, re.S).group(1)
    created = set(re.findall(r"--from-literal=([\w-]+)=", command))
    used = set()
    for where, c in containers():
        assert secret_leaks(c) == [], where
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == SECRET, where
                used.add(ref["key"])
    assert used == created  # README's command creates exactly the keys the manifests read
    assert secret_leaks({"env": [{"name": "MILVUS_PASSWORD", "value": "hunter2"}]}) == ["MILVUS_PASSWORD"]
    assert secret_leaks({"args": ["--token=root:hunter2"]}) == ["--token=root:hunter2"]
    for path in [*MANIFESTS, DEPLOY / "milvus-values.yaml", DEPLOY / "README.md"]:
        assert "minioadmin" not in path.read_text(), path  # the chart's and MinIO's factory credentials


def entrypoint_script() -> str:
    line = next(x for x in (DOCKER / "Dockerfile.client").read_text().splitlines() if x.startswith("ENTRYPOINT"))
    command = json.loads(line.split(None, 1)[1])
    assert command[0] == "python"
    return command[1]


def client_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, args) of every container that runs a client/ command."""
    found = []
    for where, c in containers():
        if not c["image"].startswith("mmsearch-client:"):
            continue
        command = c.get("command", ["python", entrypoint_script()])
        if command == ["python", "-c"] or command[0] == "sleep":  # milvus-init's script, the loader pod
            continue
        assert command[0] == "python" and len(command) == 2, where
        found.append((where, command[1], c.get("args", [])))
    return found


def help_flags(script: str) -> set[str]:
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    # the option lines only (argparse indents them by two), not flags that help prose mentions
    return set(re.findall(r"^  (?:-\w+(?: \S+)?, )?(--[a-z0-9][a-z0-9-]*)", out.getvalue(), re.M))


def flag_errors(script: str, args: list[str]) -> list[str]:
    """Flags not spelled out in the command's --help (argparse alone takes prefixes such as --max-search),
    then whatever its parser refuses."""
    known = help_flags(script)
    wrong = [flag for flag in flag_values(args) if flag not in known]
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            module.parse_args(args)
        except SystemExit:
            wrong.append(err.getvalue().strip().splitlines()[-1])
    return wrong


def test_every_flag_in_a_manifest_exists_in_its_commands_help():
    commands = client_commands()
    assert {script for _, script, _ in commands} == CLIENT_SCRIPTS
    for where, script, args in commands:
        assert flag_errors(script, args) == [], where


def test_the_flag_check_rejects_an_abbreviation_and_an_unknown_flag():
    assert flag_errors("client/app.py", ["--max-search=4"]) == ["--max-search"]
    assert flag_errors("client/index.py", ["--no-such-flag"])[0] == "--no-such-flag"
    assert flag_errors("client/upgrade.py", ["--milvus-uri=http://milvus:19530"])  # needs --tag, --rollback...
    assert flag_errors("client/upgrade.py", ["--rollback"]) == []


def test_clients_reach_tritons_service_and_the_milvus_release():
    services = {o["metadata"]["name"]: {p["port"] for p in o["spec"]["ports"]} for _, o in OBJECTS
                if o["kind"] == "Service"}
    for where, _script, args in client_commands():
        flags = flag_values(args)
        if "--triton-url" in flags:
            host, port = flags["--triton-url"].split(":")
            assert int(port) in services[host], where
        # `helm install milvus ...`: the chart names the proxy Service after a release that contains "milvus"
        assert flags["--milvus-uri"] == f"http://milvus:{CHART_VALUES['service']['port']}", where
    assert "helm install milvus " in README


# -- what compose runs ----------------------------------------------------------------------------------------


def compose_health_url(service: str) -> tuple[int, str]:
    port, path = re.search(r"localhost:(\d+)(/[\w/]+)", " ".join(SERVICES[service]["healthcheck"]["test"])).groups()
    return int(port), path


def named_port(c: dict, name_or_number) -> int:
    return next(p["containerPort"] for p in c["ports"] if name_or_number in (p.get("name"), p["containerPort"]))


def test_triton_runs_as_compose_runs_it():
    c = container("Deployment", "triton")
    assert c["image"] == SERVICES["triton"]["image"]
    assert "command" not in c and "args" not in c  # the Dockerfile's CMD, as in compose
    rolling = find("Deployment", "triton")["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0  # a restart that loads a new model set keeps serving
    dockerfile = (DOCKER / "Dockerfile").read_text()
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()}
    assert {p["containerPort"] for p in c["ports"]} == exposed
    assert {p["port"] for p in find("Service", "triton")["spec"]["ports"]} == exposed
    port, path = compose_health_url("triton")
    ready = c["readinessProbe"]["httpGet"]
    assert (named_port(c, ready["port"]), ready["path"]) == (port, path) == (8000, "/v2/health/ready")
    live = c["livenessProbe"]["httpGet"]
    assert (named_port(c, live["port"]), live["path"]) == (port, "/v2/health/live")
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == path
    start_period = int(SERVICES["triton"]["healthcheck"]["start_period"].removesuffix("s"))
    assert startup["periodSeconds"] * startup["failureThreshold"] >= start_period
    gpus = SERVICES["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["count"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus == 1
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    models = re.search(r"--model-repository=(\S+)", dockerfile).group(1)
    assert mounts[models].get("readOnly") is True  # compose mounts the repository :ro
    compose_targets = {resolve(v).split(":")[1] for v in SERVICES["triton"]["volumes"]}
    assert compose_targets <= set(mounts)
    (shm,) = [v for v in find("Deployment", "triton")["spec"]["template"]["spec"]["volumes"] if v["name"] ==
              mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert shm["emptyDir"]["sizeLimit"] == SERVICES["triton"]["shm_size"].replace("g", "Gi")
    env = {e["name"] for e in c["env"]}
    assert env == set(SERVICES["triton"]["environment"])


def test_the_page_runs_as_compose_runs_it_with_searches_sized_to_its_cpus():
    from client.app import parse_args

    c = container("Deployment", "page")
    deployment = find("Deployment", "page")
    assert deployment["spec"]["replicas"] >= 2
    assert c["command"] == SERVICES["page"]["entrypoint"]
    compose_args = flag_values([resolve(a) for a in SERVICES["page"]["command"]])
    ours = flag_values(c["args"])
    # The one difference: compose's single page logs events to its volume; pods on several nodes cannot share
    # that SQLite file (client/events.py), so they log none until a shared store exists.
    assert compose_args.pop("--events") == "/events/events.db" and ours.get("--events") == ""
    assert {k: ours.get(k) for k in compose_args} == compose_args
    args = parse_args(c["args"])
    assert args.events == ""
    (published,) = SERVICES["page"]["ports"]
    container_port = int(published.rsplit(":", 1)[1])
    assert args.port == named_port(c, "http") == container_port
    (service_port,) = find("Service", "page")["spec"]["ports"]
    assert service_port["port"] == container_port and service_port["targetPort"] == "http"
    port, path = compose_health_url("page")
    ready = c["readinessProbe"]["httpGet"]
    assert (named_port(c, ready["port"]), ready["path"]) == (port, path) == (8080, "/api/health")
    assert c["readinessProbe"]["timeoutSeconds"] > args.timeout  # health answers within --timeout (+1 s)
    assert c["livenessProbe"]["httpGet"]["path"] != path  # a dependency's outage must not restart pages
    # two searches per core, of the cores the container may use (the default counts the node's)
    assert args.max_searches == 2 * int(c["resources"]["limits"]["cpu"])
    assert {e["name"] for e in c["env"]} == {"MILVUS_USER", "MILVUS_PASSWORD"}


def test_indexing_and_sync_run_composes_indexer_command():
    indexer = [resolve(a) for a in SERVICES["indexer"]["command"]]
    assert container("CronJob", "sync")["args"] == indexer
    assert job("index.yaml")["spec"]["template"]["spec"]["containers"][0]["args"] == indexer
    assert find("CronJob", "sync")["spec"]["concurrencyPolicy"] == "Forbid"
    (upgrade,) = job("upgrade.yaml")["spec"]["template"]["spec"]["containers"]
    assert {k: v for k, v in flag_values(upgrade["args"]).items() if k != "--tag"}.items() <= \
        flag_values(indexer).items()  # an upgrade indexes as the indexer does
    (rollback,) = job("rollback.yaml")["spec"]["template"]["spec"]["containers"]
    assert "--rollback" in rollback["args"] and rollback["command"] == upgrade["command"]


def test_milvus_init_runs_composes_script():
    (c,) = job("milvus-init.yaml")["spec"]["template"]["spec"]["containers"]
    assert c["command"] == SERVICES["milvus-init"]["entrypoint"]
    assert c["args"] == SERVICES["milvus-init"]["command"]
    assert {e["name"] for e in c["env"]} == set(SERVICES["milvus-init"]["environment"])


def test_prometheus_scrapes_the_targets_compose_scrapes_on_every_pod():
    ours = {j["job_name"]: j for j in yaml.safe_load((DEPLOY / "monitoring" / "prometheus.yml").read_text())
            ["scrape_configs"]}
    theirs = yaml.safe_load((DOCKER / "monitoring" / "prometheus.yml").read_text())["scrape_configs"]
    assert set(ours) == {j["job_name"] for j in theirs}
    for job_ in theirs:
        mine = ours[job_["job_name"]]
        assert mine["metrics_path"] == job_["metrics_path"]
        (target,) = job_["static_configs"][0]["targets"]
        app, port = target.split(":")
        (keep,) = [r for r in mine["relabel_configs"] if r.get("action") == "keep"]
        assert keep["regex"] == f"{app};{port}"
        assert keep["source_labels"] == ["__meta_kubernetes_pod_label_app",
                                         "__meta_kubernetes_pod_container_port_number"]
        deployment = find("Deployment", app)  # compose's host name is our Deployment's app label
        assert deployment["spec"]["template"]["metadata"]["labels"]["app"] == app
        assert int(port) in {p["containerPort"] for p in container("Deployment", app)["ports"]}
    c = container("Deployment", "prometheus")
    assert c["image"] == SERVICES["prometheus"]["image"]
    config = Path(flag_values(c["args"])["--config.file"])
    (generator,) = [g for g in KUSTOMIZATION["configMapGenerator"] if g["name"] == "prometheus-config"]
    assert [Path(f).name for f in generator["files"]] == [config.name]
    volumes = {v["name"]: v for v in find("Deployment", "prometheus")["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(config.parent)]
    assert volumes[mount["name"]]["configMap"]["name"] == "prometheus-config"


# -- rendered by the real tools, where the machine has them --------------------------------------------------


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: the checks above still ran on the source files")
    return path


def test_kustomize_renders_the_layout_in_one_namespace_with_generated_configs():
    """kubectl's built-in kustomize, offline (no cluster is contacted): the load restrictor, the generators
    and the namespace, as `kubectl apply -k deploy/` would send them."""
    result = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert {o["metadata"].get("namespace") for o in rendered} == {NAMESPACE}
    configmaps = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "ConfigMap"}
    (config,) = [name for name in configmaps if name.startswith("prometheus-config-")]  # hashed name
    prometheus = next(o for o in rendered if o["kind"] == "Deployment" and o["metadata"]["name"] == "prometheus")
    assert config in {v.get("configMap", {}).get("name") for v in prometheus["spec"]["template"]["spec"]["volumes"]}
    (dashboard,) = [o for name, o in configmaps.items() if name.startswith("grafana-dashboard-mmsearch-")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["mmsearch.json"] == (DOCKER / "monitoring" / "grafana-dashboard.json").read_text()
    for obj in rendered:
        if obj["kind"] != "ScaledObject":
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_kustomize_refuses_a_file_outside_deploy(tmp_path):
    broken = tmp_path / "deploy"
    shutil.copytree(DEPLOY, broken)
    (tmp_path / "outside.json").write_text("{}")
    text = (broken / "kustomization.yaml").read_text()
    (broken / "kustomization.yaml").write_text(text.replace("monitoring/grafana-dashboard.json", "../outside.json"))
    result = subprocess.run([tool("kubectl"), "kustomize", str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "outside.json" in result.stderr


def test_promtool_accepts_the_scrape_jobs_relabelling_and_refuses_a_broken_one(tmp_path):
    """Debian's Prometheus (scripts/system-deps.sh) is built without Kubernetes discovery, so promtool checks each
    job with its kubernetes_sd_configs swapped for a static target: the jobs, paths and relabel rules."""
    promtool = tool("promtool")
    config = yaml.safe_load((DEPLOY / "monitoring" / "prometheus.yml").read_text())
    for job_ in config["scrape_configs"]:
        assert job_.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job_["static_configs"] = [{"targets": ["example:1"]}]

    def check(cfg: dict) -> subprocess.CompletedProcess:
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg))
        return subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)

    result = check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    config["scrape_configs"][0]["relabel_configs"][0]["action"] = "kep"
    assert check(config).returncode != 0
