"""Generates the gRPC/protobuf stubs from protos/ at build time (they are never committed)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTO_ROOT = ROOT / "protos"


def generate_stubs() -> None:
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    for proto in sorted(PROTO_ROOT.rglob("*.proto")):
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={PROTO_ROOT}",
                f"--pyi_out={PROTO_ROOT}", f"--grpc_python_out={PROTO_ROOT}", str(proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    for package in {p.parent for p in PROTO_ROOT.rglob("*.proto")} | {PROTO_ROOT / "loraplex"}:
        (package / "__init__.py").touch()


class BuildPyWithStubs(build_py):
    def run(self):
        generate_stubs()
        super().run()


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPyWithStubs})
