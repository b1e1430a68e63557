"""Summarize a gpu_check.sh output folder as markdown (figures only; nothing is re-measured)."""

import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    out = Path(sys.argv[1])
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?"
    s1, s2 = load(out / "stage1.json"), load(out / "stage2.json")
    tests = (out / "tests.log").read_text().strip().splitlines()[-1:] if (out / "tests.log").exists() else ["not run"]
    lines = [f"# GPU check\n\nDevice: {gpu}\n\nGPU tests: {tests[0] if tests else '?'}\n"]
    steps = [row.split("\t") for row in (out / "steps.tsv").read_text().splitlines()] if (out / "steps.tsv").exists() else []
    if steps:  # every step's outcome, so a step without figures can never pass unseen
        lines += ["| step | outcome | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {name} | {outcome} | {seconds} | {detail} |" for name, outcome, seconds, detail in steps]
        lines.append("")
    for extra in ("elapsed.txt", "skipped.txt", "failed.txt"):
        if (out / extra).exists():
            lines.append((out / extra).read_text().strip() + "\n")
    if s1:
        p, n = s1["pipelined"], s1.get("naive") or {"images_per_s": 0, "views_per_s": 0, "peak_rss_mb": 0}
        s1.setdefault("speedup_steady", 0)
        lines += [
            f"## Stage one ({s1['model']}, {s1['precision']}, {s1['image_size']} JPEGs, grids {s1['grids']})",
            f"- pipelined: {p['images_per_s']:.1f} images/s, {p['views_per_s']:.0f} views/s steady; {p['process_images_per_s']:.1f} images/s whole process",
            f"- naive per-crop loop: {n['images_per_s']:.2f} images/s ({n['views_per_s']:.0f} views/s); speedup {s1['speedup_steady']:.1f}x steady",
            f"- {s1.get('gflops_per_view', 0):.3g} GFLOP per view; {s1.get('achieved_tflops_end_to_end', 0):.3g} TFLOP/s end to end = {100 * (s1.get('fraction_of_dense_bf16_peak') or 0):.0f}% of dense bf16 peak",
            f"- time split (s): " + ", ".join(f"{k} {v:.1f}" for k, v in p["split"].items()),
            f"- peak RSS: naive {n['peak_rss_mb']:.0f} MB, pipelined {p['peak_rss_mb']:.0f} MB\n",
        ]
    if s2:
        c = s2["compute"]
        lines += [
            f"## Stage two ({c['variant']}, micro-batch {c['micro_batch']}, mask ratio {c['mask_ratio']}, bf16)",
            f"- compute: {c['images_per_s']:.0f} images/s, {c['gflops_per_image']:.3g} GFLOP per image (fwd+bwd), {c['achieved_tflops']:.3g} TFLOP/s = {100 * (c.get('fraction_of_dense_bf16_peak') or 0):.0f}% of dense bf16 peak, {c['peak_memory_gb'] or 0:.1f} GB",
        ]
        if "end_to_end" in s2:
            e = s2["end_to_end"]
            for source, what in (("decode", "decoding the JPEGs"), ("cache", "images stored in the cache")):
                if source in e:
                    r = e[source]
                    lines.append(f"- end to end, {what} ({e['workers']} workers, {e['images']} generated 500x375 JPEGs): "
                                 f"{r['images_per_s_second_half']:.0f} images/s, data wait {100 * r['data_wait_fraction_second_half']:.1f}% of step time")
    for name, what in (("stage1_pure", "pure_bf16"), ("stage1_compile", "pure_bf16 + torch.compile")):
        v = load(out / f"{name}.json")
        if v:
            p = v["pipelined"]
            base = s1.get("pipelined", {}).get("images_per_s")
            ratio = f"; {p['images_per_s'] / base:.2f}x the bf16 autocast run above" if base else ""
            lines += [
                f"## Stage one, {what} ({v['image_size']} JPEGs)",
                f"- {p['images_per_s']:.1f} images/s, {p['views_per_s']:.0f} views/s steady{ratio}; "
                f"{100 * (v.get('fraction_of_dense_bf16_peak') or 0):.0f}% of dense bf16 peak end to end; compile warm-up {p.get('compile_warmup_s', 0):.0f} s",
                f"- time split (s): " + ", ".join(f"{k} {x:.1f}" for k, x in p["split"].items()) + "\n",
            ]
    c2 = load(out / "stage2_compile.json").get("compute")
    if c2:
        lines.append(f"## Stage two with torch.compile ({c2['variant']}, micro-batch {c2['micro_batch']}, bf16)")
        lines.append(f"- compute: {c2['images_per_s']:.0f} images/s, {c2['achieved_tflops']:.3g} TFLOP/s = {100 * (c2.get('fraction_of_dense_bf16_peak') or 0):.0f}% of dense bf16 peak "
                     f"(warm-up with compilation {c2['warmup_s']:.0f} s), {c2['peak_memory_gb'] or 0:.1f} GB\n")
    prof = load(out / "profile.json")
    for part, what in (("teacher", "the teacher's forward"), ("student", "a student training step")):
        if part in prof:
            f = prof[part]
            busy = f"; the GPU busy {f['device_busy_ms_per_iter']:.1f} ms of it ({100 * f['device_busy_fraction']:.0f}%)" if "device_busy_fraction" in f else ""
            lines.append(f"## Profile of {what} ({f.get('model') or f.get('variant')}, {f.get('views') or f.get('micro_batch')} per iteration)")
            lines.append(f"- {f['wall_ms_per_iter']:.1f} ms per iteration{busy}; top ops in profile_{part}.txt\n")
    inf = load(out / "inference.json")
    if inf:
        lines.append(f"\n## Inference ({inf['variant']}, short side {inf['short_side']}, window {inf['window']}, stride {inf['stride']}, {inf['classes']} classes)")
        lines.append(f"- {inf['images_per_s']:.1f} images/s ({inf['ms_per_image']:.1f} ms per 500x375 image)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
