"""Generated gRPC stubs for `proto/llama4_ep.proto`, committed so a fresh clone needs no codegen.

Regenerate after editing the .proto: `python -m serving.proto_gen` (needs grpcio-tools).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

PROTO = Path(__file__).resolve().parents[2] / "proto" / "llama4_ep.proto"
PACKAGE_DIR = "serving/proto_gen"  # the import path the generated modules use
STUBS = ("llama4_ep_pb2.py", "llama4_ep_pb2_grpc.py", "llama4_ep_pb2.pyi")


def generate(out_dir: Path, proto: Path = PROTO) -> list[Path]:
    """Run protoc on `proto`, writing the stubs (named in STUBS) into `out_dir`.

    The proto directory is mapped onto the package path, so the generated `_pb2_grpc` module
    imports `serving.proto_gen.llama4_ep_pb2` rather than a top-level `llama4_ep_pb2`."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PACKAGE_DIR}={proto.parent}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"{PACKAGE_DIR}/{proto.name}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in STUBS:
            shutil.copyfile(Path(tmp, PACKAGE_DIR, name), out_dir / name)
            written.append(out_dir / name)
    return written
