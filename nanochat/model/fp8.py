"""fp8 matmuls for training on H100-class GPUs: the block linears become torchao's Float8Linear
(tensorwise scaling); the head stays in bf16.

Where it fits: ``scripts.base_train --fp8`` and ``scripts.bench_train --fp8`` convert the model
after it is built and before ``torch.compile``. Upstream measured 1.17x tokens/s at d26 on
H100 (docs/benchmarks.md has ours when a GPU was lent).
"""

from __future__ import annotations

from nanochat.common import UsageError


def use_fp8(model) -> None:
    """Convert the eligible linears in place (dimensions divisible by 16, not the head)."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UsageError("--fp8 needs torchao: pip install torchao") from None
    import torch.nn as nn

    def eligible(module, name: str) -> bool:
        return (
            isinstance(module, nn.Linear)
            and "lm_head" not in name
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    convert_to_float8_training(model, module_filter_fn=eligible)
