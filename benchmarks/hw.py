"""Hardware figures shared by the benchmarks: which accelerator, its dense bf16 peak, achieved fraction.

Model FLOPs per token follow the usual estimate for a decoder with N parameters: 2N for a forward pass;
LoRA training adds the backward pass through the frozen weights for the activations (another 2N) but no
weight gradients for them, so 4N per trained token (the LoRA factors' own FLOPs are negligible).
"""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # bare "H100" names on SXM boards
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


def bf16_peak_tflops(device_name: str) -> float | None:
    """Peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3' (longest matching key wins)."""
    hits = [k for k in BF16_PEAK_TFLOPS if k.lower() in device_name.lower()]
    return BF16_PEAK_TFLOPS[max(hits, key=len)] if hits else None


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def accelerator_figures(tokens_per_s: float, params: int, flops_per_param_token: float) -> dict:
    """Absolute throughput and, on CUDA, the fraction of the device's bf16 peak it reaches."""
    out = {"tokens_per_s": tokens_per_s, "device": "cpu"}
    if not torch.cuda.is_available():
        return out
    name = torch.cuda.get_device_name(0)
    tflops = tokens_per_s * params * flops_per_param_token / 1e12
    peak = bf16_peak_tflops(name)
    out.update(device=name, achieved_tflops=tflops, bf16_peak_tflops=peak,
               fraction_of_bf16_peak=(tflops / peak) if peak else None)
    return out
