"""Write a Triton model repository for a checkpoint: tokenizers, image preprocessing, the tower
graphs, and the ensembles the client calls.

    query_encoder   QUERY (BYTES)                     -> query_tokenizer -> query_tower -> EMBEDDING
    product_encoder TITLE, DESCRIPTION, IMAGE (BYTES) -> product_tokenizer -> text_tower  \
                                                      -> image_preprocess -> image_tower -> fusion -> EMBEDDING
    image_encoder   IMAGE (BYTES)                     -> query_image_preprocess -> image_tower -> image_query_head

Three flavours differ only in how a tower graph runs:
  python       the same model.onnx run by ONNX Runtime inside a Python-backend model (CPU, local).
               The text towers tokenize in their own process (no query_tokenizer/product_tokenizer
               models): one Python-model hop less per request, and batches padded only to their
               longest text instead of max_length (bench/results/serving.md measures both)
  onnxruntime  Triton's onnxruntime backend on GPU with ONNX Runtime's TensorRT accelerator and an
               engine cache: the default on GPU hosts (no build step; engines appear on first load)
  tensorrt     platform tensorrt_plan: engines built ahead of time on the target GPU with trtexec
               (docker/build_engines.py reads ENGINES_FILE, which lists every engine's shapes)
The ensembles' names, inputs and outputs are the same in every flavour: clients never know which runs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from core import preprocess as preprocess_module
from core.fusion_rule import FusionRule
from core.specs import (
    ATTENTION_MASK,
    EMBEDDING,
    FINGERPRINT_PARAMETER,
    FUSION,
    FUSION_RULE_KEY,
    FUSION_RULE_PARAMETER,
    IMAGE,
    IMAGE_EMBEDDING,
    IMAGE_ENCODER,
    IMAGE_INPUT,
    IMAGE_MASK,
    IMAGE_MASK_SPEC,
    IMAGE_PREPROCESS,
    IMAGE_QUERY_EMBEDDING,
    IMAGE_QUERY_HEAD,
    IMAGE_TOWER,
    INPUT_IDS,
    PIXEL_VALUES,
    PRODUCT_EMBEDDING,
    PRODUCT_ENCODER,
    PRODUCT_SPACE_KEY,
    PRODUCT_SPACE_PARAMETER,
    PRODUCT_TEXT_INPUTS,
    PRODUCT_TOKENIZER,
    QUERY_EMBEDDING,
    QUERY_ENCODER,
    QUERY_IMAGE_PREPROCESS,
    QUERY_INPUTS,
    QUERY_TOKENIZER,
    QUERY_TOWER,
    TEXT_EMBEDDING,
    TEXT_MASK,
    TEXT_MASK_SPEC,
    TEXT_TOWER,
    GraphSpec,
    TensorSpec,
    in_model_set,
    model_name,
)

from .graphs import weights_digest

TRITON_MODELS = Path(__file__).parent / "triton_models"
BACKENDS = ("python", "onnxruntime", "tensorrt")
ENGINES_FILE = "engines.json"  # tensorrt flavour: what docker/build_engines.py builds


@dataclass
class ServingCfg:
    """Batching and instance settings, chosen by measurement (bench/tune.py -> bench/results/tuning.md).

    The query path is latency-bound: one instance using every core. The product path (indexing) is
    throughput-bound: two single-threaded instances per product tower let the text and image towers of
    different requests run side by side (1.8x the products/s of one two-thread instance on 2 cores).
    """

    max_batch_size: int = 64
    tower_instances: int = 2  # per product-side tower (text, image, fusion, image-query head)
    intra_op_threads: int = 1  # python flavour: ONNX Runtime threads per product-side tower instance
    query_tower_instances: int = 1
    query_intra_op_threads: int = 0  # 0 = ONNX Runtime's default (all cores)
    preprocess_instances: int = 1
    allow_spinning: bool = True  # python flavour: product-side ONNX Runtime worker threads busy-wait between runs
    # ... but not the query tower's: beside the page and Milvus on the same cores, its idle threads' spinning
    # took the CPU the rest of a search needed (bench/results/service.md); alone it is worth a little.
    query_allow_spinning: bool = False
    # The query path does not wait: a delay is pure waiting at concurrency 1, and under load requests queue behind
    # the busy instance and are batched anyway (bench/results/tuning.md: 335 vs 284 queries/s at concurrency 8
    # against a 500 us delay). The product path keeps a delay: with delay 0 on every model tritonserver 2.51 crashed
    # once (SIGSEGV in TRITONSERVER_ServerInferAsync) and hung once in the hostile-input tests (product ensembles
    # whose image branch fails while the text branch runs).
    query_queue_delay_us: int = 0
    product_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = preprocess_module.DEFAULT_MAX_PIXELS
    trt_fp16: bool = True
    extra: dict = field(default_factory=dict)


def _dims(t: TensorSpec) -> str:
    return "[ " + ", ".join(str(d) for d in t.dims) + " ]"


def _io(kind: str, tensors) -> str:
    body = ",\n".join(f'  {{\n    name: "{t.name}"\n    data_type: {t.dtype}\n    dims: {_dims(t)}\n  }}'
                      for t in tensors)
    return f"{kind} [\n{body}\n]\n"


def _params(params: dict[str, str]) -> str:
    return "".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: {json.dumps(str(v))} }}\n}}\n'
                   for k, v in params.items())


def _batching(delay_us: int, preferred: tuple[int, ...], max_batch: int) -> str:
    sizes = ", ".join(str(s) for s in preferred if s <= max_batch)
    return (f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n"
            f"  max_queue_delay_microseconds: {delay_us}\n}}\n")


def _config(name: str, header: str, inputs, outputs, serving: ServingCfg, kind: str, count: int,
            delay_us: int | None, params: dict[str, str] | None = None, extra: str = "") -> str:
    text = f'name: "{name}"\n{header}max_batch_size: {serving.max_batch_size}\n'
    text += _io("input", inputs) + _io("output", outputs)
    text += f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n"
    if delay_us is not None:
        text += _batching(delay_us, serving.preferred_batch_sizes, serving.max_batch_size)
    return text + _params(params or {}) + extra


def _write(repo: Path, name: str, config: str, files: dict[str, Path] | None = None) -> None:
    version = repo / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(config)
    for dst, src in (files or {}).items():
        if src.is_dir():
            shutil.copytree(src, version / dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, version / dst)
    if not files:
        (version / ".gitkeep").touch()  # an ensemble's version folder is empty


def _trt_accelerator(serving: ServingCfg, name: str) -> str:
    precision = "FP16" if serving.trt_fp16 else "FP32"
    return (
        "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [ {\n"
        '      name : "tensorrt"\n'
        f'      parameters {{ key: "precision_mode" value: "{precision}" }}\n'
        '      parameters { key: "max_workspace_size_bytes" value: "2147483648" }\n'
        '      parameters { key: "trt_engine_cache_enable" value: "true" }\n'
        f'      parameters {{ key: "trt_engine_cache_path" value: "/tmp/trt_cache/{name}" }}\n'
        "    } ]\n  }\n}\n"
    )


def _engine_shapes(spec: GraphSpec, fixed: dict[str, int], serving: ServingCfg) -> dict[str, dict[str, list[int]]]:
    """trtexec optimization profile per input: batch 1..max_batch_size (opt = the largest preferred
    batch); a dynamic sequence axis is pinned to the tokenizer's fixed padded length."""
    opt_batch = max(s for s in serving.preferred_batch_sizes if s <= serving.max_batch_size)
    shapes = {}
    for t in spec.inputs:
        dims = [fixed.get(t.name, d) if d == -1 else d for d in t.dims]
        shapes[t.name] = {"min": [1, *dims], "opt": [opt_batch, *dims], "max": [serving.max_batch_size, *dims]}
    return shapes


@dataclass
class TextFront:
    """A text tower's own tokenization (python flavour): its text inputs, tokenizer parameters and files."""

    inputs: list[TensorSpec]
    params: dict[str, str]
    files: dict[str, Path]
    text_mask: bool  # also output text_mask (0 = product without text), which fusion reads


def _tower(repo: Path, spec: GraphSpec, graph: Path, backend: str, serving: ServingCfg, delay_us: int,
           query: bool = False, front: TextFront | None = None, name: str | None = None) -> None:
    name = name or spec.name
    instances = serving.query_tower_instances if query else serving.tower_instances
    threads = serving.query_intra_op_threads if query else serving.intra_op_threads
    files = {"model.onnx": graph}
    if graph.with_suffix(".onnx.data").exists():
        files[graph.name + ".data"] = graph.with_suffix(".onnx.data")
    if backend == "python":
        files["model.py"] = TRITON_MODELS / "onnx_runner.py"
        inputs, outputs = spec.inputs, list(spec.outputs)
        spinning = serving.query_allow_spinning if query else serving.allow_spinning
        params = {"intra_op_threads": threads, "allow_spinning": int(spinning)}
        if front is not None:
            inputs, params, files = front.inputs, {**params, **front.params}, {**files, **front.files}
            if front.text_mask:
                outputs.append(TEXT_MASK_SPEC)
        config = _config(name, 'backend: "python"\n', inputs, outputs, serving, "KIND_CPU",
                         instances, delay_us, params)
    elif backend == "onnxruntime":
        config = _config(name, 'platform: "onnxruntime_onnx"\n', spec.inputs, spec.outputs, serving,
                         "KIND_GPU", instances, delay_us, extra=_trt_accelerator(serving, name))
    else:  # tensorrt: model.onnx stays beside the plan as the engine's source
        config = _config(name, 'platform: "tensorrt_plan"\n', spec.inputs, spec.outputs, serving,
                         "KIND_GPU", instances, delay_us)
    _write(repo, name, config, files)


def model_fingerprint(checkpoint: Path, graphs_dir: Path) -> str:
    """Which weights and which graph variant a repository serves: the checkpoint's weights digest plus
    the variant name. Every ensemble reports it (config parameter "fingerprint"); clients compare it."""
    return f"{weights_digest(checkpoint)}-{graphs_dir.name}"


def _ensemble(repo: Path, name: str, inputs, steps: list[tuple[str, dict, dict]], out_dim: int,
              serving: ServingCfg, params: dict[str, str] | None = None, tag: str = "") -> None:
    text = f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {serving.max_batch_size}\n'
    text += _io("input", inputs) + _io("output", [TensorSpec(EMBEDDING, "TYPE_FP32", (out_dim,))])
    text += "ensemble_scheduling {\n  step [\n"
    rendered = []
    for model, input_map, output_map in steps:
        s = f'    {{\n      model_name: "{model_name(model, tag)}"\n      model_version: -1\n'
        s += "".join(f'      input_map {{ key: "{k}" value: "{v}" }}\n' for k, v in input_map.items())
        s += "".join(f'      output_map {{ key: "{k}" value: "{v}" }}\n' for k, v in output_map.items())
        rendered.append(s + "    }")
    text += ",\n".join(rendered) + "\n  ]\n}\n"
    _write(repo, model_name(name, tag), text.replace(f'name: "{name}"', f'name: "{model_name(name, tag)}"', 1)
           + _params(params or {}))


def write_repository(repo: Path, checkpoint: Path, specs: dict[str, GraphSpec], graphs_dir: Path,
                     backend: str, serving: ServingCfg | None = None, tag: str = "") -> list[str]:
    """Write every model of the model set `tag` (core.specs.model_name) into the repository, beside any
    other set it holds; returns the set's model names."""
    nm = lambda base: model_name(base, tag)  # noqa: E731
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    serving = serving or ServingCfg()
    config = json.loads((checkpoint / "config.json").read_text())
    pre, model_cfg = config["preprocess_cfg"], config["model_cfg"]
    dim = model_cfg["embed_dim"]
    fingerprint = {FINGERPRINT_PARAMETER: model_fingerprint(checkpoint, graphs_dir)}
    # A query tower trained against a base model's fixed product vectors (training/from_judgments.py) records
    # the base's weights digest: its queries match the vectors the base's product side made with this variant.
    base = config.get(PRODUCT_SPACE_KEY)
    fingerprint[PRODUCT_SPACE_PARAMETER] = f"{base}-{graphs_dir.name}" if base else fingerprint[FINGERPRINT_PARAMETER]
    if config.get(FUSION_RULE_KEY) is not None:  # checked here: a bad rule fails the export, not every search
        fingerprint[FUSION_RULE_PARAMETER] = FusionRule.from_dict(config[FUSION_RULE_KEY]).to_json()
    repo.mkdir(parents=True, exist_ok=True)
    tokenizer_json = checkpoint / pre["tokenizer_dir"] / "tokenizer.json"
    text_files = {"tokenizer.json": tokenizer_json, "preprocess.py": Path(preprocess_module.__file__)}
    query_inputs, text_inputs = list(QUERY_INPUTS), list(PRODUCT_TEXT_INPUTS)
    multimodal = FUSION in specs
    tokenizers = {  # name: (inputs, max_length)
        QUERY_TOKENIZER: (query_inputs, pre["query_max_length"]),
        PRODUCT_TOKENIZER: (text_inputs, pre["max_length"]),
    }

    def tokenizer_params(name: str) -> dict[str, str]:
        inputs, max_length = tokenizers[name]
        return {"tokenizer_file": "tokenizer.json", "max_length": max_length,
                "text_inputs": ",".join(t.name for t in inputs)}

    fused = backend == "python"
    fronts = {}
    if fused:
        files = {**text_files, "text_inputs.py": TRITON_MODELS / "tokenizer.py"}
        fronts = {QUERY_TOWER: TextFront(query_inputs, tokenizer_params(QUERY_TOKENIZER), files, False),
                  TEXT_TOWER: TextFront(text_inputs, tokenizer_params(PRODUCT_TOKENIZER), files, multimodal)}
    else:
        for name, (inputs, max_length) in tokenizers.items():
            outputs = [TensorSpec(INPUT_IDS, "TYPE_INT64", (max_length,)),
                       TensorSpec(ATTENTION_MASK, "TYPE_INT64", (max_length,))]
            if name == PRODUCT_TOKENIZER:
                outputs.append(TEXT_MASK_SPEC)
            delay = serving.query_queue_delay_us if name == QUERY_TOKENIZER else serving.product_queue_delay_us
            _write(repo, nm(name), _config(nm(name), 'backend: "python"\n', inputs, outputs, serving, "KIND_CPU",
                                       serving.preprocess_instances, delay, tokenizer_params(name)),
                   {"model.py": TRITON_MODELS / "tokenizer.py", **text_files})
    for name, spec in specs.items():
        delay = serving.query_queue_delay_us if name == QUERY_TOWER else serving.product_queue_delay_us
        _tower(repo, spec, graphs_dir / f"{name}.onnx", backend, serving, delay, query=name == QUERY_TOWER,
               front=fronts.get(name), name=nm(name))
    if backend == "tensorrt":
        lengths = {QUERY_TOWER: pre["query_max_length"], TEXT_TOWER: pre["max_length"]}
        engines = {nm(name): {"onnx": f"{nm(name)}/1/model.onnx", "plan": f"{nm(name)}/1/model.plan",
                              "fp16": serving.trt_fp16,
                          "shapes": _engine_shapes(spec, {INPUT_IDS: lengths.get(name, -1),
                                                          ATTENTION_MASK: lengths.get(name, -1)}, serving)}
                   for name, spec in specs.items()}
        engines_file = repo / ENGINES_FILE
        if engines_file.is_file():  # other model sets' engines stay listed
            engines = {**{k: v for k, v in json.loads(engines_file.read_text()).items() if not in_model_set(k, tag)},
                       **engines}
        engines_file.write_text(json.dumps(engines, indent=2) + "\n")

    # The ensemble wiring: each step maps its model's tensors (names from core.specs) to ensemble tensors.
    identity = lambda tensors: {t.name: t.name for t in tensors}  # noqa: E731
    if fused:  # the towers read the raw text themselves
        query_steps = [(QUERY_TOWER, identity(query_inputs), {QUERY_EMBEDDING: EMBEDDING})]
        text_steps = [(TEXT_TOWER, identity(text_inputs), {TEXT_EMBEDDING: TEXT_EMBEDDING})]
    else:
        q_ids = {INPUT_IDS: "q_" + INPUT_IDS, ATTENTION_MASK: "q_" + ATTENTION_MASK}
        p_ids = {INPUT_IDS: "p_" + INPUT_IDS, ATTENTION_MASK: "p_" + ATTENTION_MASK}
        query_steps = [(QUERY_TOKENIZER, identity(query_inputs), q_ids),
                       (QUERY_TOWER, q_ids, {QUERY_EMBEDDING: EMBEDDING})]
        text_steps = [(PRODUCT_TOKENIZER, identity(text_inputs), dict(p_ids)),
                      (TEXT_TOWER, p_ids, {TEXT_EMBEDDING: TEXT_EMBEDDING})]
    _ensemble(repo, QUERY_ENCODER, query_inputs, query_steps, dim, serving, fingerprint, tag)
    if not multimodal:  # text-only model: the product embedding is the text tower's
        text_steps[-1][2][TEXT_EMBEDDING] = EMBEDDING
        _ensemble(repo, PRODUCT_ENCODER, text_inputs, text_steps, dim, serving, fingerprint, tag)
        return model_set(repo, tag)
    text_steps[0][2][TEXT_MASK] = TEXT_MASK  # the tokenizing step says which products have text

    image = pre["image"]
    pixels = TensorSpec(PIXEL_VALUES, "TYPE_FP32", (3, image["image_size"], image["image_size"]))
    image_params = {"preprocess_cfg": json.dumps(image), "max_pixels": serving.max_image_pixels,
                    "max_bytes": serving.max_image_bytes}
    image_files = {"model.py": TRITON_MODELS / "image_preprocess.py",
                   "preprocess.py": Path(preprocess_module.__file__)}
    for name, allow_missing, outputs in ((IMAGE_PREPROCESS, "true", (pixels, IMAGE_MASK_SPEC)),
                                         (QUERY_IMAGE_PREPROCESS, "false", (pixels,))):
        _write(repo, nm(name), _config(
            nm(name), 'backend: "python"\n', [IMAGE_INPUT], outputs, serving, "KIND_CPU",
            serving.preprocess_instances, serving.product_queue_delay_us,
            {**image_params, "allow_missing": allow_missing}), image_files)

    _ensemble(repo, PRODUCT_ENCODER, [*text_inputs, IMAGE_INPUT], [
        *text_steps,
        (IMAGE_PREPROCESS, {IMAGE: IMAGE}, {PIXEL_VALUES: PIXEL_VALUES, IMAGE_MASK: IMAGE_MASK}),
        (IMAGE_TOWER, {PIXEL_VALUES: PIXEL_VALUES}, {IMAGE_EMBEDDING: IMAGE_EMBEDDING}),
        (FUSION, {TEXT_EMBEDDING: TEXT_EMBEDDING, IMAGE_EMBEDDING: IMAGE_EMBEDDING,
                  TEXT_MASK: TEXT_MASK, IMAGE_MASK: IMAGE_MASK}, {PRODUCT_EMBEDDING: EMBEDDING}),
    ], dim, serving, fingerprint, tag)
    q_pixels, q_image = "q_" + PIXEL_VALUES, "q_" + IMAGE_EMBEDDING
    _ensemble(repo, IMAGE_ENCODER, [IMAGE_INPUT], [
        (QUERY_IMAGE_PREPROCESS, {IMAGE: IMAGE}, {PIXEL_VALUES: q_pixels}),
        (IMAGE_TOWER, {PIXEL_VALUES: q_pixels}, {IMAGE_EMBEDDING: q_image}),
        (IMAGE_QUERY_HEAD, {IMAGE_EMBEDDING: q_image}, {IMAGE_QUERY_EMBEDDING: EMBEDDING}),
    ], dim, serving, fingerprint, tag)
    return model_set(repo, tag)


def model_set(repo: Path, tag: str = "") -> list[str]:
    """The names of the models of set `tag` the repository holds."""
    return sorted(p.parent.name for p in repo.glob("*/config.pbtxt") if in_model_set(p.parent.name, tag))
