"""Tables of the story benchmark (bench/story_bench.py), printed and written into docs/performance.md."""
from __future__ import annotations

from pathlib import Path

from report import markdown_table, write_block

BEGIN = "<!-- story_bench: generated block, rewritten by bench/story_bench.py --doc -->"
END = "<!-- story_bench: end of generated block -->"
GIB, MIB = 2**30, 2**20
HEADER = ["run", "panels", "rows per UNet call", "ms/step", "ms per image-step", "x vanilla image (same rows/call)",
          "x vanilla image (ppc images/call)", "read row ms", "x vanilla row", "identity calls ms/step",
          "reference calls ms/step", "peak GiB",
          "x vanilla peak (same rows/call)", "x vanilla peak (ppc images/call)", "identity bank MiB"]


def _vanilla(results: dict) -> tuple[dict, dict]:
    return results["runs"].get("vanilla-rows", {}), results["runs"].get("vanilla-panels", {})


def rows(results: dict) -> list[list[str]]:
    vanilla_rows, vanilla_panels = _vanilla(results)
    image_ms = [v.get("ms_per_step", 0) / max(v.get("panels", 1), 1) for v in (vanilla_rows, vanilla_panels)]
    peaks = [v.get("peak_bytes") for v in (vanilla_rows, vanilla_panels)]
    row_ms = vanilla_rows.get("sub_calls", {}).get("plain", {}).get("ms_per_row_step")
    body = []
    for name, run in results["runs"].items():
        if "error" in run:
            body.append([name, "", "", run["error"]] + [""] * (len(HEADER) - 4))
            continue
        calls = run["sub_calls"]
        per_image = run["ms_per_step"] / run["panels"]
        read = calls.get("read") or calls.get("plain")
        identity, reference = calls.get("identity"), calls.get("reference")
        body.append([
            name, str(run["panels"]), "/".join(str(r) for c in calls.values() for r in c["rows_per_call"]),
            f"{run['ms_per_step']:.1f}", f"{per_image:.2f}",
            *(f"{per_image / ms:.3f}x" if ms else "" for ms in image_ms),
            f"{read['ms_per_row_step']:.2f}" if read else "",
            f"{read['ms_per_row_step'] / row_ms:.3f}x" if read and row_ms else "",
            f"{identity['ms'] / run['steps']:.1f}" if identity else "",
            f"{reference['ms'] / run['steps']:.1f}" if reference else "",
            f"{run['peak_bytes'] / GIB:.2f}",
            *(f"{run['peak_bytes'] / peak:.3f}x" if peak else "" for peak in peaks),
            f"{run['bank_bytes'] / MIB:.0f}" if run["story"] else "",
        ])
    return body


def redraw_lines(results: dict) -> list[str]:
    """Re-rendering one panel against its whole story (issue 16's target: at most 8% of the time)."""
    lines = []
    for name, run in results["runs"].items():
        whole = results["runs"].get(name.removesuffix("-redraw-1"))
        if not name.endswith("-redraw-1") or "error" in run or not whole or "error" in whole:
            continue
        lines.append(f"Re-rendering one panel of the {whole['panels']}-panel story ({run['panels'] - 1} identity panels "
                     f"drawn beside it): {run['ms_per_step']:.1f} ms/step, {100 * run['ms_per_step'] / whole['ms_per_step']:.1f}% "
                     f"of the whole story's {whole['ms_per_step']:.1f} ms/step (target: at most 8%).")
    return lines


def table_text(results: dict) -> str:
    body = rows(results)
    widths = [max(len(r[i]) for r in [HEADER] + body) for i in range(len(HEADER))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in [HEADER] + body]
    return "\n".join(table + redraw_lines(results))


def generated_block(results: dict) -> str:
    env, settings = results["environment"], results["settings"]
    lines = [BEGIN, "", f"Machine: {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, ComfyUI {env['comfyui']}, "
             f"attention `{env['comfy_attention']}`. SDXL UNet, random fp16 weights, {settings['size']}x"
             f"{settings['size']}, {settings['steps']} steps, {settings['sampler']}, CFG {settings['cfg']}, rate "
             f"{settings['rate'][0]}, all {settings['output_layers']} output-block self-attention layers every step; "
             f"2 characters x {settings['identity_panels']} identity panels; panels_per_call "
             f"{settings['panels_per_call']}.", ""]
    lines += markdown_table(HEADER, rows(results))
    lines += [""] + redraw_lines(results) if redraw_lines(results) else []
    lines += ["", "Checks (one step, a probe after CSA): "
              + "; ".join(f"{name}: {c['sub_calls']} UNet calls, story attention in {c['story_layers']}/"
                          f"{c['expected_layers']} layers, {c['rows_seen']}/{c['expected_rows']} rows"
                          for name, c in results["checks"].items()),
              "", END]
    return "\n".join(lines)


def update_doc(path: Path, results: dict) -> None:
    """Replace (or append) the story block of ``path``."""
    write_block(path, generated_block(results), BEGIN, END)
