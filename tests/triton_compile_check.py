"""Compiles every Triton kernel of loraplex for an H100 (sm_90) down to a cubin, on a machine
without a GPU: Triton's compiler and ptxas need no device. Run as a script, outside the tests'
interpreter mode (tests/test_lora_triton_kernel.py does); prints one line per kernel and dtype.

    python tests/triton_compile_check.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile: before Triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from server.lora import triton_kernel as lora  # noqa: E402
from server.model import triton_attention as attention  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
I32 = "i32"


def signature(kernel, pointers: dict[str, str], floats: tuple[str, ...] = ()) -> dict[str, str]:
    """Every argument of `kernel`: its pointers' element types as given, constexprs, i32 else."""
    names = kernel.arg_names
    constexprs = {kernel.arg_names[p.num] for p in kernel.params if p.is_constexpr}
    return {name: "constexpr" if name in constexprs else pointers.get(name)
            or ("fp32" if name in floats else I32) for name in names}


def compile_for_h100(kernel, pointers, constants, floats=()) -> int:
    source = ASTSource(fn=kernel, signature=signature(kernel, pointers, floats),
                       constexprs=constants)
    return len(triton.compile(source, target=H100).asm["cubin"])


def main() -> None:
    print(f"triton {triton.__version__}")
    for dtype in ("fp32", "bf16", "fp16"):
        table = f"*{dtype}"
        ints = {"rank_ptr": "*i32", "entries_ptr": "*i32", "tokens_ptr": "*i32"}
        common = dict(HAS_RANK=True, IEEE=dtype == "fp32", UPCAST=False, BLOCK_R=16)
        sizes = {
            "shrink": compile_for_h100(
                lora._shrink_kernel, {"x_ptr": table, "a_ptr": table, "scale_ptr": "*fp32",
                                      "h_ptr": "*fp32", **ints},
                dict(common, BLOCK_M=16, BLOCK_K=64)),
            "expand": compile_for_h100(
                lora._expand_kernel, {"h_ptr": "*fp32", "b_ptr": table, "y_ptr": table, **ints},
                dict(common, BLOCK_M=64, BLOCK_N=64)),
            "paged decode attention": compile_for_h100(
                attention._decode_kernel, {"q_ptr": table, "k_ptr": table, "v_ptr": table,
                                           "tables_ptr": "*i64", "lens_ptr": "*i32",
                                           "out_ptr": table},
                dict(GROUP=4, G_PAD=16, D_PAD=64, BLOCK_N=64, HAS_WINDOW=True,
                     IEEE=dtype == "fp32", UPCAST=False), floats=("sm_scale",)),
        }
        for name, size in sizes.items():
            print(f"{name} {dtype}: cubin {size} bytes")


if __name__ == "__main__":
    main()
