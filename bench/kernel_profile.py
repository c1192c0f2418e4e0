"""Where a UNet step's device time goes: torch.profiler kernels, grouped into a few families."""
from __future__ import annotations

FAMILIES = (  # first match wins; lower-case substrings of kernel names
    ("attention", ("fmha", "flash", "attention", "attn", "sdpa", "cudnn_generated")),
    ("gather (index_select)", ("index_select", "indexselect", "index_", "gather")),
    ("convolution", ("conv", "implicit", "winograd", "fprop", "dgrad")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "addmm", "mm_")),
    ("norm", ("norm", "layer_norm", "group_norm")),
    ("mask / sampling", ("topk", "sort", "radix", "rand", "bernoulli", "philox", "compare", "eq_", "bitwise", "logical")),
)


def family(name: str) -> str:
    lower = name.lower()
    for label, needles in FAMILIES:
        if any(needle in lower for needle in needles):
            return label
    return "elementwise / other"


def kernel_rows(prof) -> list[tuple[str, float, int]]:
    """(name, self device ms, calls) of the device kernels; CPU ops when no device ran."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    device = [e for e in events if e.device_type != DeviceType.CPU and e.self_device_time_total > 0]
    if device:
        rows = [(e.key, e.self_device_time_total / 1000.0, e.count) for e in device]
    else:
        rows = [(e.key, e.self_cpu_time_total / 1000.0, e.count) for e in events if e.key.startswith("aten::")]
    return sorted(rows, key=lambda row: -row[1])


def summarise(prof, steps: int) -> dict:
    """Per-step totals by family and the top kernels."""
    rows = kernel_rows(prof)
    families: dict[str, float] = {}
    for name, ms, _ in rows:
        families[family(name)] = families.get(family(name), 0.0) + ms / steps
    return {
        "families_ms": dict(sorted(families.items(), key=lambda item: -item[1])),
        "total_ms": sum(families.values()),
        "top": [{"kernel": name[:140], "ms_per_step": ms / steps, "calls_per_step": count / steps}
                for name, ms, count in rows[:25]],
    }


def format_table(title: str, summary: dict) -> str:
    lines = [title, "", f"device time per step: {summary['total_ms']:.2f} ms", "", "by family (ms/step):"]
    lines += [f"  {label:<24} {ms:9.2f}" for label, ms in summary["families_ms"].items()]
    lines += ["", "top kernels (ms/step, calls/step):"]
    lines += [f"  {row['ms_per_step']:9.3f} {row['calls_per_step']:7.1f}  {row['kernel']}" for row in summary["top"]]
    return "\n".join(lines) + "\n"
