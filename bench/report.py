"""Turn the results dict into derived figures (bandwidth bound, targets) and a Markdown table (pure)."""

from __future__ import annotations

from typing import Any

CONCURRENCY_LEVELS = ("1", "4", "8", "16")
# issue 15's TTFT targets: <= 0.5x llama.cpp's on a CPU with one of these; elsewhere no worse than prompt rows on the
# decode kernels (the path of before), within NO_WORSE (this VM's run-to-run noise on the same code: ~3%)
MATRIX_ISA = frozenset({"avx512_bf16", "amx_bf16", "amx_int8"})
NO_WORSE = 1.05


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def single_rate(run: dict[str, Any]) -> float | None:
    return (run.get("single_stream") or {}).get("decode_tok_s")


def agg_rate(run: dict[str, Any], level: str) -> float | None:
    return ((run.get("concurrency") or {}).get(level) or {}).get("aggregate_tok_s")


def add_bounds(runs: dict[str, dict[str, Any]], bandwidth_gb_s: float | None) -> None:
    """Fill bound_tok_s and fraction_of_bound for every run that knows its bytes per token."""
    if not bandwidth_gb_s:
        return
    for run in runs.values():
        per_token = run.get("bytes_per_token")
        if not per_token:
            continue
        bound = bandwidth_gb_s * 1e9 / per_token
        run["bound_tok_s"] = round(bound, 2)
        rate = single_rate(run)
        run["fraction_of_bound"] = None if rate is None else round(rate / bound, 3)


def markdown_table(runs: dict[str, dict[str, Any]]) -> str:
    header = ("| model | engine | mode | via | load s | peak RSS MiB | 1-stream tok/s | TTFT s "
              "| agg tok/s @1 | @4 | @8 | @16 | TTFT p50/p99 @8 s | bound tok/s | % of bound |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in runs.values():
        if run.get("error") and not run.get("single_stream"):
            lines.append(f"| {run.get('model', '?')} | {run.get('engine', '?')} | {run.get('mode', '?')} "
                         f"| {run.get('interface', '')} | error: {str(run['error'])[:80]} |" + " |" * 10)
            continue
        c8 = (run.get("concurrency") or {}).get("8") or {}
        ttft8 = "-" if not c8 else f"{_fmt(c8.get('ttft_p50_s'), 2)}/{_fmt(c8.get('ttft_p99_s'), 2)}"
        frac = run.get("fraction_of_bound")
        cells = [
            run.get("model", "?"), run.get("engine", "?"), run.get("mode", "?"), run.get("interface", ""),
            _fmt(run.get("load_s")), _fmt(run.get("peak_rss_mb"), 0), _fmt(single_rate(run), 2),
            _fmt((run.get("single_stream") or {}).get("ttft_s"), 3),
            *(_fmt(agg_rate(run, level), 2) for level in CONCURRENCY_LEVELS),
            ttft8, _fmt(run.get("bound_tok_s"), 1), "-" if frac is None else f"{frac * 100:.0f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _target(name: str, value: float | None, op: str, threshold: float, detail: str) -> dict[str, Any]:
    met = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
    return {"target": name, "value": None if value is None else round(value, 4), "op": op,
            "threshold": threshold, "met": met, "detail": detail}


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 3/6 targets from whatever sections the results hold; a missing figure gives met=None."""
    runs: dict[str, dict[str, Any]] = results.get("runs", {})
    small = "qwen2.5-0.5b"
    ours = {m: runs.get(f"{small}/ours/{m}") or {} for m in ("bf16", "int8", "int4")}
    quant = {m: single_rate(r) for m, r in ours.items() if m != "bf16" and single_rate(r)}
    best_mode = max(quant, key=lambda m: quant[m]) if quant else None
    best = quant.get(best_mode) if best_mode else None
    llama = single_rate(runs.get(f"{small}/llama.cpp/Q4_K_M") or {})
    hf_bf16 = single_rate(runs.get(f"{small}/transformers-generate/bf16") or {})
    out = [
        _target("ours best quantized vs llama.cpp Q4_K_M (single stream)",
                best / llama if best and llama else None, ">=", 0.8, f"ours {best_mode}: {best} tok/s, llama.cpp: {llama}"),
        _target("ours best quantized vs transformers bf16 generate",
                best / hf_bf16 if best and hf_bf16 else None, ">=", 2.5, f"ours {best_mode}: {best}, transformers: {hf_bf16}"),
    ]
    for mode in sorted(quant, key=lambda m: m != best_mode):  # the best mode first, then the other
        tag = f"ours {mode}" + (" (fastest)" if mode == best_mode and len(quant) > 1 else "")
        out.append(_target(f"{tag} single stream / bandwidth bound", ours[mode].get("fraction_of_bound"), ">=", 0.7,
                           f"{single_rate(ours[mode])} of bound {ours[mode].get('bound_tok_s')} tok/s"))
        a1, a8 = agg_rate(ours[mode], "1"), agg_rate(ours[mode], "8")
        out.append(_target(f"{tag}: aggregate @8 streams / @1 stream", a8 / a1 if a1 and a8 else None,
                           ">=", 2.5, f"@1 {a1} tok/s, @8 {a8} tok/s (same request shape)"))
    over = results.get("overload") or {}
    if over:
        ok = over.get("http_429", 0) > 0 and over.get("errors", 1) == 0 and over.get("healthy_after") is True
        out.append({"target": "16 streams, max_queue 8: 429s, no errors, still healthy", "value": None,
                    "op": "==", "threshold": None, "met": ok if "error" not in over else None,
                    "detail": f"429: {over.get('http_429')}, errors: {over.get('errors')}, "
                              f"healthy after: {over.get('healthy_after')}"})
    mem = results.get("memory_1p5b") or {}
    if mem.get("int4_over_bf16") is not None or mem:
        out.append(_target("1.5B shape: int4 peak RSS / bf16 peak RSS", mem.get("int4_over_bf16"), "<=", 0.4,
                           f"bf16 {mem.get('bf16_peak_rss_mb')} MiB, int4 {mem.get('int4_peak_rss_mb')} MiB"))
    for mode, pc in (results.get("prefix_cache") or {}).items():  # issue 14
        out.append(_target(f"prefix cache ({mode}): 2nd TTFT / 1st TTFT, ~1,000-token shared prefix",
                           pc.get("second_over_first"), "<=", 0.25,
                           f"{pc.get('ttft_first_s')} s -> {pc.get('ttft_second_s')} s; cache off "
                           f"{pc.get('cache_off_ttft_s')}; identical outputs on/off: {pc.get('identical_outputs')}"))
        out.append({"target": f"prefix cache ({mode}): identical outputs with the cache on and off", "value": None,
                    "op": "==", "threshold": None, "met": pc.get("identical_outputs"),
                    "detail": f"prompts of {pc.get('prompt_tokens')} tokens"})
    pf = results.get("prefill") or {}
    isa = set(pf.get("cpu_isa") or [])
    engines = pf.get("engines") or {}
    if pf and not isa & MATRIX_ISA:  # issue 15, a CPU without a matrix engine: no worse than the path of before
        for mode in ("int8", "int4"):
            res, before = engines.get(f"ours/{mode}") or {}, engines.get(f"ours/{mode}-decode-kernels") or {}
            ratio = res["ttft_s"] / before["ttft_s"] if res.get("ttft_s") and before.get("ttft_s") else None
            out.append(_target(f"TTFT ours/{mode} / every prompt row on the decode kernels (the path of before), "
                               f"~{pf.get('prompt_tokens')}-token prompt ({'+'.join(sorted(isa)) or 'no AVX2'})",
                               ratio, "<=", NO_WORSE, f"{res.get('ttft_s')} s vs {before.get('ttft_s')} s; prefill "
                               f"kernel {(res.get('kernel_plan') or {}).get('prefill_kernel')}"))
    elif pf:  # TTFT <= 0.5x llama.cpp's on AVX512-BF16/AMX
        base = (engines.get("llama.cpp/Q4_K_M") or {}).get("ttft_s")
        for key in ("ours/int8", "ours/int4"):
            if key in engines:
                res = engines[key]
                out.append(_target(f"TTFT {key} / llama.cpp Q4_K_M, ~{pf.get('prompt_tokens')}-token prompt "
                                   f"({'+'.join(pf.get('cpu_isa') or [])})", res.get("ttft_over_llamacpp"), "<=", 0.5,
                                   f"{res.get('ttft_s')} s vs {base} s; "
                                   f"prefill kernel {(res.get('kernel_plan') or {}).get('prefill_kernel')}"))
    for row in (results.get("decode_steps") or {}).get("rows", []):  # issue 15: >= 60% of the bound, int4 and int8
        if row.get("backend") == "dq" and row.get("batch") == 1:
            bw = ((results.get("bandwidth") or {}).get("copy") or {}).get("best_gb_s")
            bound = _step_bound(row, bw)
            paired = " (median of rounds, each against its own moment's read)" if "paired_fraction" in row else ""
            huge = (f"; against a read on 2 MiB pages ({row['read_gb_s_huge']} GB/s): "
                    f"{row['paired_fraction_huge'] * 100:.0f}%") if row.get("paired_fraction_huge") is not None else ""
            out.append(_target(f"decode step {row['mode']}, batch 1 / bandwidth bound (runtime default kernels)",
                               _step_fraction(row, bound), ">=", 0.6,
                               f"best {row['tok_s']} tok/s ({row['step_ms']} ms) vs {bound and round(bound, 1)} tok/s "
                               f"at {row.get('read_gb_s') or bw} GB/s " + ("read" if row.get("read_gb_s") else "copy")
                               + paired + huge))
    ppl = results.get("perplexity") or {}
    for mode, limit in (("int8", 0.01), ("int4", 0.10)):
        rise = (ppl.get(mode) or {}).get("rise_vs_bf16")
        if ppl:
            out.append(_target(f"perplexity rise {mode} vs bf16", rise, "<=", limit,
                               f"bf16 {(ppl.get('bf16') or {}).get('perplexity')}, "
                               f"{mode} {(ppl.get(mode) or {}).get('perplexity')}"))
    return out


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| target | value | goal | met |", "|---|---|---|---|"]
    for t in targets:
        goal = f"{t['op']} {t['threshold']}" if t["threshold"] is not None else "yes"
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['value'], 3)} | {goal} | {met} ({t['detail']}) |")
    return "\n".join(lines)


def perplexity_table(ppl: dict[str, Any]) -> str:
    lines = ["| mode | perplexity | rise vs bf16 | tokens | stored decode bytes/token |", "|---|---|---|---|---|"]
    for mode in ("bf16", "int8", "int4"):
        row = ppl.get(mode) or {}
        if not row:
            continue
        if row.get("error"):
            lines.append(f"| {mode} | error: {str(row['error'])[:80]} | | | |")
            continue
        rise = row.get("rise_vs_bf16")
        lines.append(f"| {mode} | {_fmt(row.get('perplexity'), 4)} | "
                     f"{'-' if rise is None else f'{rise * 100:+.2f}%'} | {row.get('tokens_scored')} | "
                     f"{_fmt(row.get('decode_bytes_per_token'))} |")
    return "\n".join(lines)


ISA_LABELS = {"avx2": "AVX2", "avxvnni": "AVX-VNNI", "avx512vnni": "AVX-512 VNNI"}  # ckernels' ISA names


def kernel_table(kernels: dict[str, Any]) -> str:
    """Per layer shape and row count: PyTorch's packed kernels vs ours (ms per call, median)."""
    isa, other = kernels.get("dq_isa"), kernels.get("dq_other_isa")
    also = f" (and on {ISA_LABELS.get(other, other)})" if other else ""
    lines = [f"Ours on {ISA_LABELS.get(isa, isa)}{also}.", ""] if isa else []
    extra = f" | ours int8 ms {ISA_LABELS.get(other, other)} | ours int4 ms {ISA_LABELS.get(other, other)}" if other else ""
    lines += ["| model | layer | N x K | M | aten int8 ms | ours int8 ms | aten int4 ms | ours int4 ms "
              f"| int8 speed-up | int4 speed-up{extra} |", "|---|---|---|---|---|---|---|---|---|---|"
              + ("---|---|" if other else "")]
    for r in kernels.get("rows", []):
        more = (f" | {_fmt(r.get(f'dq_int8_ms_{other}'), 3)} | {_fmt(r.get(f'dq_int4_ms_{other}'), 3)}"
                if other else "")
        lines.append(f"| {r['model']} | {r['layer']} | {r['N']} x {r['K']} | {r['M']} | {_fmt(r.get('aten_int8_ms'), 3)} "
                     f"| {_fmt(r.get('dq_int8_ms'), 3)} | {_fmt(r.get('aten_int4_ms'), 3)} | {_fmt(r.get('dq_int4_ms'), 3)} "
                     f"| {_fmt(r.get('int8_speedup'), 2)}x | {_fmt(r.get('int4_speedup'), 2)}x{more} |")
    return "\n".join(lines)


def merge_ttft_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's prefill steps (one per round) -> their fields, the median TTFT over every timed run."""
    ok = [r for r in rounds if r.get("ttft_s_runs")]
    if not ok:
        return {"error": "; ".join(str(r.get("error")) for r in rounds)[:600] or "no run"}
    times = sorted(t for r in ok for t in r["ttft_s_runs"])
    med = times[len(times) // 2] if len(times) % 2 else (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2
    tokens = ok[0].get("prompt_tokens") or 0
    return {**{k: v for k, v in ok[-1].items() if k not in ("log",)}, "ttft_s": round(med, 4), "ttft_s_runs": times,
            "prefill_tok_s": round(tokens / med, 1) if med else None, "rounds": len(ok),
            "errors": [r["error"] for r in rounds if r.get("error")]}


def prefill_table(pf: dict[str, Any]) -> str:
    """TTFT per engine, then the prefill kernel vs our decode kernels per layer shape (256 rows)."""
    lines = ["| engine | prompt tokens | TTFT s (median) | prompt tok/s | TTFT / llama.cpp | prefill kernel |",
             "|---|---|---|---|---|---|"]
    for key, r in (pf.get("engines") or {}).items():
        kern = (r.get("kernel_plan") or {}).get("prefill_kernel", "-")
        lines.append(f"| {key} | {_fmt(r.get('prompt_tokens'), 0)} | {_fmt(r.get('ttft_s'), 3)} "
                     f"| {_fmt(r.get('prefill_tok_s'), 0)} | {_fmt(r.get('ttft_over_llamacpp'), 2)} | {kern} "
                     f"{r.get('error') or ''}|")
    kt = pf.get("kernels") or {}
    if kt.get("rows"):
        chosen = kt.get("chosen")
        int4 = f"; int4 weights: {kt['chosen_int4']} ({kt.get('why_int4')})" if "chosen_int4" in kt else ""
        kerns = ("int8mm", "int8vnni", "int8avx2", "bf16")
        lines += ["", f"Prefill kernel chosen for this CPU: {chosen} ({kt.get('why')}){int4}; ms per call at M rows "
                  "(GFLOP/s; - where a kernel's code does not run on this CPU):", "",
                  "| layer | N x K | M | dq int8 | " + " | ".join(f"{k} int8" for k in kerns) + " | dq int4 | "
                  + " | ".join(f"{k} int4" for k in kerns) + " | chosen vs dq int8 / int4 |",
                  "|---|---|---|" + "---|" * (2 * len(kerns) + 3)]
        for r in kt["rows"]:
            def cell(key: str, row: dict[str, Any] = r) -> str:
                return f"{_fmt(row.get(key + '_ms'), 2)} ({_fmt(row.get(key + '_gflop_s'), 0)})"
            lines.append(f"| {r['layer']} | {r['N']} x {r['K']} | {r['M']} | {cell('dq_int8')} | "
                         + " | ".join(cell(f"{k}_int8") for k in kerns) + f" | {cell('dq_int4')} | "
                         + " | ".join(cell(f"{k}_int4") for k in kerns)
                         + f" | {_fmt(r.get('int8_speedup'), 2)}x / {_fmt(r.get('int4_speedup'), 2)}x |")
    elif kt.get("error"):
        lines.append(f"\nprefill kernels: {kt['error']}")
    return "\n".join(lines)


def _step_bound(row: dict[str, Any], bandwidth_gb_s: float | None) -> float | None:
    """A decode-step row's bound in tokens/s: the read-only bandwidth of its own moment (read_gb_s) when measured,
    else the run's copy bandwidth, over the weight bytes one token reads."""
    gb_s = row.get("read_gb_s") or bandwidth_gb_s
    return gb_s * 1e9 / row["bytes_per_token"] if gb_s and row.get("bytes_per_token") else None


def _step_fraction(row: dict[str, Any], bound: float | None) -> float | None:
    """A decode-step row's fraction of its bound: the median of its rounds, each against the bandwidth of its own
    moment (paired_fraction), when measured so; else its best step against `bound`."""
    if row.get("paired_fraction") is not None:
        return float(row["paired_fraction"])
    return row["tok_s"] / bound if bound else None


def decode_steps_table(steps: dict[str, Any], bandwidth_gb_s: float | None = None) -> str:
    """The model's own decode step (no engine, no HTTP): tokens/s per mode, kernel backend and batch; with
    the copy bandwidth, batch 1 as a fraction of the bound (bandwidth / the weight bytes a step reads)."""
    rows = steps.get("rows", [])
    batches = sorted({r["batch"] for r in rows})
    bound_col = bool(bandwidth_gb_s) and any(r.get("bytes_per_token") and r["batch"] == 1 for r in rows)
    lines = ["| mode | kernels | " + " | ".join(f"batch {b} tok/s (ms/step)" for b in batches)
             + (" | batch 1 / bound |" if bound_col else " |"),
             "|---|---|" + "---|" * (len(batches) + bound_col)]
    seen: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in rows:
        seen.setdefault((r["mode"], r["backend"]), {})[r["batch"]] = r
    for (mode, backend), per in seen.items():
        isa = backend.removeprefix("dq-")
        label = ({"aten": "PyTorch packed", "-": "PyTorch bf16", "dq": "ours (runtime default)"}.get(backend)
                 or (f"ours ({ISA_LABELS[isa]} int)" if isa in ISA_LABELS else backend))
        cells = [f"{per[b]['tok_s']} ({per[b]['step_ms']})" if b in per else "-" for b in batches]
        if bound_col:
            one = per.get(1) or {}
            bound = _step_bound(one, bandwidth_gb_s)
            frac = _step_fraction(one, bound)
            huge = one.get("paired_fraction_huge")
            cells.append((f"{frac * 100:.0f}% of {bound:.1f}" if bound and frac is not None else "-")
                         + (f" ({huge * 100:.0f}% on 2 MiB pages)" if huge is not None else ""))
        lines.append(f"| {mode} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
