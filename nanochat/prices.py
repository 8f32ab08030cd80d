"""List prices of the hardware a run rents: USD per GPU-hour, per CPU core-hour, per GiB-hour.

Pure data, shared down the stack: the launcher's cost estimates (``backends/pricing.py``,
before a remote run of any stage: data -> tokenizer -> pretrain -> eval -> midtrain -> SFT
-> RL -> chat/serve) and the report stage's rough cost of the GPU-hours the stages used
(``scripts/report.py``). Modal's on-demand list prices (modal.com/pricing, checked
2026-11): change them here, and only here, when they move. Imports nothing.
"""

from __future__ import annotations

# USD per GPU-hour, by Modal's GPU type name.
GPU_PRICE = {
    "B200": 6.25,
    "H200": 4.54,
    "H100": 3.95,
    "A100-80GB": 2.50,
    "A100-40GB": 2.10,
    "A100": 2.10,
    "L40S": 1.95,
    "A10G": 1.10,
    "A10": 1.10,
    "L4": 0.80,
    "T4": 0.59,
}
CPU_CORE_PRICE = 0.047  # USD per physical core-hour
MEMORY_PRICE = 0.008  # USD per GiB-hour
