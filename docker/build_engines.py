"""Build the TensorRT engines of a `--backend tensorrt` model repository, on the GPU that will serve them.

Engines are specific to the GPU model and the TensorRT version, so they are built where they run,
with the TensorRT of the Triton release (NGC 24.10: TensorRT 10.5, Triton 2.51):

    docker compose -f docker/compose.yaml --profile tensorrt run --rm engines
    # which is: docker run --rm --gpus all -v $PWD/model_repository:/models -v $PWD/docker:/opt/mmsearch \\
    #     nvcr.io/nvidia/tensorrt:24.10-py3 python3 /opt/mmsearch/build_engines.py /models

The shapes come from ENGINES_FILE (engines.json), which `python -m export --backend tensorrt` writes from
the same tensor specs as the configs: batch 1..max_batch_size, sequence pinned to the tokenizer's padded
length. Standard library only: it runs in the bare TensorRT image.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ENGINES_FILE = "engines.json"  # export.repository.ENGINES_FILE; this script must not import the project
TRTEXEC_PATHS = ("trtexec", "/usr/src/tensorrt/bin/trtexec")


def _shape_arg(shapes: dict, which: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in s[which])}" for name, s in shapes.items())


def trtexec_command(trtexec: str, repo: Path, engine: dict, workspace_mib: int, timing_cache: Path | None) -> list[str]:
    cmd = [trtexec, f"--onnx={repo / engine['onnx']}", f"--saveEngine={repo / engine['plan']}",
           f"--minShapes={_shape_arg(engine['shapes'], 'min')}", f"--optShapes={_shape_arg(engine['shapes'], 'opt')}",
           f"--maxShapes={_shape_arg(engine['shapes'], 'max')}", f"--memPoolSize=workspace:{workspace_mib}M",
           "--skipInference"]
    if engine.get("fp16"):
        cmd.append("--fp16")
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


def find_trtexec(explicit: str | None) -> str:
    for candidate in ([explicit] if explicit else TRTEXEC_PATHS):
        found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if found:
            return found
    raise SystemExit(f"trtexec not found (tried {explicit or ', '.join(TRTEXEC_PATHS)}): run this in the TensorRT "
                     "image of the same NGC release as the Triton image, or pass --trtexec")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("repository", type=Path, help="model repository written by python -m export --backend tensorrt")
    p.add_argument("--trtexec", help="trtexec binary (default: on PATH or /usr/src/tensorrt/bin/trtexec)")
    p.add_argument("--workspace-mib", type=int, default=4096, help="TensorRT builder workspace, MiB")
    p.add_argument("--force", action="store_true", help="rebuild engines that are newer than their ONNX graph")
    p.add_argument("--dry-run", action="store_true", help="print the trtexec commands without running them")
    args = p.parse_args(argv)
    manifest = args.repository / ENGINES_FILE
    if not manifest.is_file():
        raise SystemExit(f"{manifest} not found: export with `python -m export --backend tensorrt --out ...` first")
    engines = json.loads(manifest.read_text())
    trtexec = "trtexec" if args.dry_run else find_trtexec(args.trtexec)
    timing_cache = args.repository / "trt_timing.cache"
    failed = []
    for name, engine in engines.items():
        onnx, plan = args.repository / engine["onnx"], args.repository / engine["plan"]
        if not onnx.is_file():
            raise SystemExit(f"{name}: {onnx} is missing")
        if plan.is_file() and plan.stat().st_mtime >= onnx.stat().st_mtime and not args.force:
            print(f"{name}: up to date ({plan})")
            continue
        cmd = trtexec_command(trtexec, args.repository, engine, args.workspace_mib, timing_cache)
        print(f"{name}: {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-3000:] + result.stderr[-3000:], file=sys.stderr)
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
