"""The export report as text (what `spikeprune export` prints)."""
from __future__ import annotations

from ..precision import WEIGHT_PRECISIONS


def _kb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _bytes_lines(m: dict) -> list[str]:
    f = m["file"]
    lines = [f"file bytes: {', '.join(f'{k.replace(chr(95), chr(32))} {v:,} B' for k, v in f.items() if v)}"]
    rec = m.get("reconciliation")
    if rec:
        shares = ", ".join(f"{p} {rec['share_of_weights'][p]:.1%}" for p in WEIGHT_PRECISIONS
                           if rec["share_of_weights"][p])
        out = rec["outside_count"]
        terms = " + ".join([f"{t['term']} {t['counted']:,}" for t in rec["terms"] if t["counted"] or t["in_file"]]
                           + ([f"layers never called {-out['never_called']:,}"] if out.get("never_called") else []))
        lines.append(f"weights as the budget counts them: {terms} = {rec['counted']:,} B "
                     f"({rec['bits_per_weight']:.2f} bits per weight; weights held at {shares}); in the file: "
                     + ("the same, term by term" if rec["unaccounted"] == 0 else
                        f"{-rec['unaccounted']:,} B fewer (identical constants stored once)" if rec["unaccounted"] < 0
                        else f"{rec['unaccounted']:,} B more (BatchNorms left unfolded)")
                     + f"; outside the count: graph {out['graph']:,} B"
                     + (f", input normalisation {out['input_normalisation']:,} B" if out["input_normalisation"] else "")
                     + (f", other constants {out['other_constants']:,} B" if out["other_constants"] else "")
                     + (f", layers never called (counted, not in the graph) {out['never_called']:,} B"
                        if out.get("never_called") else "")
                     + f" = {rec['file']:,} B on disk")
    rec8 = m.get("int8_reconciliation")
    if rec8:
        lines.append(f"int8 size: measure {rec8['measure_int8']:,} B {rec8['batchnorm_folding']:+,} B BatchNorm folded "
                     f"+{rec8['scales']:,} B scales +{rec8['zero_points']:,} B zero points = {rec8['weights_in_file']:,} "
                     f"B of weights in the file, +{rec8['graph']:,} B graph = {rec8['file']:,} B on disk")
    return lines


def _loop_words(r: dict) -> str:
    return "unrolled" if r.get("time_loop", "unrolled") == "unrolled" else "in one ONNX Loop"


def format_export_report(r: dict) -> str:
    m = r["memory"]
    batch = f"batch of {r['batch']} fixed" if r.get("batch") else "dynamic batch"
    lines = [f"wrote {r['path']}: {r['format']} opset {r['opset']}, {r['precision']} weights, {_kb(r['bytes'])} "
             f"({r['family']}, T={r['T']} {_loop_words(r)}, {batch}; {r['exporter']})",
             f"input: {r['preprocessing']['description']}",
             f"BatchNorm folded into {r['batchnorm_folded']} layers"
             + (f"; not folded (no layer before them in the cost table): {', '.join(r['batchnorm_unfolded'])}"
                if r["batchnorm_unfolded"] else ""),
             f"weights after folding: {m['deployed']['params']:,} values; fp32 {_kb(m['deployed']['fp32'])}, "
             f"int8 {_kb(m['deployed']['int8'])} (measure, BN unfolded: fp32 {_kb(m['measure']['fp32'])}, "
             f"int8 {_kb(m['measure']['int8'])})"]
    lines += _bytes_lines(m)
    g = r.get("graph")
    if g:
        top = ", ".join(f"{op} {k}" for op, k in list(g["by_op"].items())[:5])
        lines.append(f"graph: {g['nodes']:,} nodes ({top}, ...), the time loop {_loop_words(r)} over T={r['T']}"
                     if r.get("time_loop", "unrolled") == "unrolled" else
                     f"graph: {g['nodes']:,} nodes ({top}, ...), one time step as the body of one ONNX Loop over "
                     f"T={r['T']} (the LIF membranes loop-carried; the body {r['loop_body']})")
    sw = r.get("stepwise")
    if sw:
        lines.append(f"float64 check ({sw['source']}): one step at a time with the membranes carried vs the "
                     f"{sw['T']}-step forward, max |logit diff| {sw['max_abs_logit_diff']:.2e}")
    f64 = r["float64"]
    lines.append(f"float64 check ({f64['source']}): folded + unrolled vs original, max |logit diff| "
                 f"{f64['max_abs_logit_diff']:.2e}, classes agree {100 * f64['class_agreement']:.1f}%")
    c = r["check"]
    if c is None:
        lines.append("ONNX Runtime check: skipped (--no-check)")
    else:
        line = (f"ONNX Runtime vs PyTorch ({c['reference']}, {c['input']}) on {c['source']} (batches "
                f"{c['batch_sizes']}): predicted classes agree on {100 * c['class_agreement']:.2f}%")
        if c["top1_torch"] is not None:
            h = c["hits"]
            line += (f"; top-1 PyTorch fp32 {100 * c['top1_torch']:.2f}% ({h['fp32']}/{c['labelled']})"
                     + ("" if c["precision"] == "fp32" else
                        f", fake-quantised {100 * c['top1_reference']:.2f}% ({h['reference']}/{c['labelled']})")
                     + f", ONNX {c['precision']} {100 * c['top1_onnx']:.2f}% ({h['onnx']}/{c['labelled']})")
        lines.append(line)
        s = c.get("spikes")
        if s and s["comparable"]:
            lines.append(f"spike decisions: {s['decisions']:,} compared, {s['tie_flips']} flipped at float32 threshold "
                         f"ties (max float64 distance to threshold {s['max_tie_margin']:.1e}), {s['downstream_flips']} "
                         f"downstream of those, in {s['images_with_flips']} images; logits of the other images "
                         f"agree to {s['max_rel_logit_diff_without_flips']:.1e} (relative)")
        elif s:
            lines.append(f"spike decisions not compared: {s['note']}")
    lines += r["warnings"]
    return "\n".join(lines)
