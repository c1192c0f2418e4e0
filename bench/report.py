"""Tables of the CSA benchmark, printed and written into a generated block of a markdown file."""
from __future__ import annotations

from pathlib import Path

from kernel_profile import family

BEGIN = "<!-- csa_bench: generated block, rewritten by bench/csa_bench.py --doc -->"
END = "<!-- csa_bench: end of generated block -->"
LABELS = {
    "vanilla": "vanilla (unpatched)",
    "ours": "ours (ConsistentAttentionPatch)",
    "ours_host": "ours, every call on ComfyUI's own kernel",
    "dense": "official formulation (dense mask)",
    "probe_nosync": "probe: ours without the sigma sync",
}
# (variant, panels, window) -> (time target, memory target) from the project's issue.
TARGETS = {("ours", 4, 0): 1.08, ("ours", 8, 4): 1.15}
MEMORY_TARGET = 1.05
GIB = 2**30


def ratios(results: dict, entry: dict) -> dict:
    vanilla = results["runs"].get(f"vanilla-p{entry['panels']}-w0", {})
    out = {}
    if "ms_median" in entry and "ms_median" in vanilla:
        out["time"] = entry["ms_median"] / vanilla["ms_median"]
    if entry.get("peak_bytes") and vanilla.get("peak_bytes"):
        out["peak"] = entry["peak_bytes"] / vanilla["peak_bytes"]
        work, vanilla_work = entry["peak_bytes"] - entry["base_bytes"], vanilla["peak_bytes"] - vanilla["base_bytes"]
        if vanilla_work > 0:
            out["work"] = work / vanilla_work
    return out


def rows(results: dict) -> list[list[str]]:
    table = []
    for name, entry in results["runs"].items():
        label = LABELS[entry["variant"]]
        window = "" if entry["variant"] in ("vanilla", "dense") else f"{entry['window'] or 'all'}"
        if "error" in entry:
            table.append([str(entry["panels"]), label, window, entry["error"], "", "", "", "", "", ""])
            continue
        r = ratios(results, entry)
        spread = "/".join(f"{m:.1f}" for m in entry.get("ms_round_medians", []))
        cuda = entry.get("peak_bytes", 0) > 0
        table.append([
            str(entry["panels"]), label, window,
            f"{entry.get('ms_median', float('nan')):.1f}", spread, f"{r.get('time', float('nan')):.3f}x",
            "/".join(f"{m:.0f}" for m in entry.get("wall_ms_per_step_rounds", [])),
            f"{entry['peak_bytes'] / GIB:.2f}" if cuda else "n/a",
            f"{r['peak']:.3f}x" if "peak" in r else "n/a",
            f"{(entry['peak_bytes'] - entry['base_bytes']) / GIB:.2f} ({r['work']:.2f}x)" if "work" in r else "n/a",
        ])
    return table


HEADER = ["panels", "variant", "window (panels sampled)", "ms/step (median)", "round medians", "x vanilla", "sampler wall ms/step",
          "peak GiB", "peak x vanilla", "peak above resident GiB (x vanilla)"]


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def table_text(results: dict) -> str:
    body = rows(results)
    widths = [max(len(r[i]) for r in [HEADER] + body) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in [HEADER] + body)


def targets(results: dict) -> list[list[str]]:
    out = []
    for (variant, panels, window), limit in TARGETS.items():
        entry = results["runs"].get(f"{variant}-p{panels}-w{window}")
        if not entry or "ms_median" not in entry:
            continue
        r = ratios(results, entry)
        out.append([f"{panels} panels, window {window}: step time", f"<= {limit:.2f}x", f"{r['time']:.3f}x",
                    "met" if r["time"] <= limit else "missed"])
    for name, entry in results["runs"].items():
        r = ratios(results, entry)
        if entry["variant"] == "ours" and "peak" in r:
            out.append([f"{entry['panels']} panels, window {entry['window']}: peak memory", f"<= {MEMORY_TARGET:.2f}x",
                        f"{r['peak']:.3f}x", "met" if r["peak"] <= MEMORY_TARGET else "missed"])
    return out


def profile_table(results: dict) -> list[str]:
    profiles = results.get("profiles") or {}
    if not profiles:
        return []
    names = list(profiles)
    families = []
    for summary in profiles.values():
        families += [f for f in summary["families_ms"] if f not in families]
    body = [[family] + [f"{profiles[n]['families_ms'].get(family, 0.0):.1f}" for n in names] for family in families]
    body.append(["**total kernel time**"] + [f"{profiles[n]['total_ms']:.1f}" for n in names])
    return markdown_table(["kernel family (ms/step)"] + names, body)


def layer_cost_table(results: dict) -> list[str]:
    body = []
    for case, groups in (results.get("layer_costs") or {}).items():
        total = 0.0
        for g in groups:
            c = g["ms_per_layer"]
            extra = c["attention_extended"] - c["attention_plain"] + c["gather_kv"] + c["plan_host"]
            total += extra * g["layers"]
            body.append([case, f"{g['tokens']} x {g['width']} ({g['heads']} heads)", str(g["layers"]),
                         f"{g['tokens']} -> {g['extended_tokens']}", f"{c['attention_plain']:.3f}",
                         f"{c['attention_extended']:.3f}", f"{c['gather_kv']:.3f}", f"{c['plan_host']:.3f}",
                         f"{extra * g['layers']:.1f}"])
        body.append([case, "**all output-block attn1 layers**", "", "", "", "", "", "", f"**{total:.1f}**"])
    if not body:
        return []
    return markdown_table(["case", "layer (tokens x width)", "layers", "keys", "attention ms (plain)",
                           "attention ms (extended)", "k+v gather ms", "plan build ms (host)",
                           "predicted extra ms/step"], body)


def attention_kernels(results: dict) -> str:
    profiles = results.get("profiles") or {}
    seen = []
    for summary in profiles.values():
        for row in summary["top"]:
            if family(row["kernel"]) == "attention" and row["kernel"] not in seen:
                seen.append(row["kernel"])
    return "; ".join(f"`{k[:90]}`" for k in seen[:4]) or "not profiled"


def generated_block(results: dict) -> str:
    env, settings = results["environment"], results["settings"]
    lines = [BEGIN, "", "### Machine and software", ""]
    lines += [
        f"- device: {env['gpu']} ({env['device']}); Python {env['python']}; torch {env['torch']}, CUDA {env['cuda']}, "
        f"cuDNN {env['cudnn']}; ComfyUI {env['comfyui']}",
        f"- ComfyUI attention backend: `{env['comfy_attention']}` (its default choice, nothing forced); "
        f"SDPA backend priority set by ComfyUI: {', '.join(env['sdpa_priority']) or 'none'}",
        f"- attention kernels seen in the profiles: {attention_kernels(results)}",
        f"- model: {'tiny SDXL-layout UNet (CPU check only)' if env['tiny'] else 'ComfyUI SDXL (BaseModel SDXL), random fp16 weights on the GPU'};"
        f" {settings['size']}x{settings['size']} px; CFG {settings['cfg']} so rows = 2 x panels; "
        f"{settings['sampler']}; CSA rate {settings['rate'][0]}/{settings['rate'][1]}, schedule "
        f"'{settings['schedule']}', blocks '{settings['blocks']}' ({settings['attn1_output_layers']} attn1 layers)",
        f"- timing: per UNet call with CUDA events (model_function_wrapper), {settings['warmup']} warm-up steps, "
        f"then {settings['rounds']} rounds x {settings['steps']} steps, median over all timed calls; peak memory = "
        "torch.cuda.max_memory_allocated over a timed sampling call, reset before each; "
        "'resident' = allocated before sampling (weights)",
    ]
    if "wall_s" in results:
        lines.append(f"- whole benchmark wall time on the device: {results['wall_s']:.0f} s")
    lines += ["", "### Step time and memory", ""] + markdown_table(HEADER, rows(results))
    check = targets(results)
    if check:
        lines += ["", "### Targets from the issue", ""] + markdown_table(["what", "target", "measured", ""], check)
    lines += ["", "### Checks", ""]
    for name, entry in results["runs"].items():
        if "error" in entry:
            continue
        diff = entry.get("max_abs_diff_vs_vanilla")
        lines.append(f"- `{name}`: attn1 layers extended in one call {entry.get('extended_layers')}/"
                     f"{entry.get('expected_layers')}; output finite: {entry.get('finite')}"
                     + (f"; max |latent - vanilla| = {diff:.3g}" if diff is not None else ""))
    costs = layer_cost_table(results)
    if costs:
        lines += ["", "### Isolated cost of one CSA layer (all rows of a step; CUDA events, median of 20)", ""] + costs
    profile = profile_table(results)
    if profile:
        lines += ["", "### Kernel time by family (torch.profiler, 2-step sampling, per step)", ""] + profile
    lines += ["", END]
    return "\n".join(lines)


def update_doc(path: Path, results: dict) -> None:
    """Replace the generated block of ``path`` (create the file around it if needed)."""
    write_block(path, generated_block(results), BEGIN, END)


def write_block(path: Path, block: str, begin: str, end: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) in place of the text between
    those markers in ``path``, or at its end."""
    text = path.read_text() if path.exists() else f"# Performance\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + block + tail)
