"""`train.compile`: torch.compile of every transformer block, and the check that this machine can.

Each Block is compiled in place (`nn.Module.compile`), so parameter names, state dicts, checkpoints and
DeepSpeed's module hooks stay as they are; the blocks share one compiled graph per grad mode (dynamo
inlines the modules and guards on shapes and dtypes, not on which block it is). The LM head stays
eager: its chunked loss is a custom autograd Function with a data-dependent loop. Compilation costs
start-up time (tens of seconds on a CPU, for every process), so the key is off by default.
"""
from __future__ import annotations

import torch

from blade.errors import ConfigError


def check_compile(device_type: str) -> None:
    """Raise a one-line ConfigError when inductor cannot compile for `device_type` here."""
    if device_type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - inductor raises RuntimeError or its own kinds
            raise ConfigError(f"config error: train.compile=true needs a C++ compiler for torch.compile on "
                              f"the CPU ({str(e).splitlines()[0][:120]}); install g++ or set "
                              f"train.compile=false") from None
    elif device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("config error: train.compile=true needs triton for torch.compile on the GPU; "
                              "install triton or set train.compile=false")


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile every block of `model.layers` in place; returns how many."""
    for block in model.layers:
        block.compile()
    return len(model.layers)
