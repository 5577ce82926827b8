"""What bench.py prints and writes: the speed table, the context-sweep table and its plot."""

import json
from pathlib import Path

from harness import describe


def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def markdown_table(head, rows):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows])


def save(text, data, md=None, json_path=None):
    print(text)
    if md:
        Path(md).write_text(text + "\n")
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=1) + "\n")


# The speed table


def derive(rows, bw, device):
    """Ratios to transformers and the fraction of the bandwidth limits, in place; returns the bandwidth used."""
    cuda = device.startswith("cuda")
    # Every probe reads memory at some rate the memory can sustain, so the
    # fastest of them is the best estimate of the limit (on this VM a batch-1
    # GEMV outruns torch's sum). On CUDA the data sheet's figure where known.
    mem_bw = max([bw["read_Bps"], *bw["gemv_Bps"].values(), *bw["mv_Bps"].values()])
    if cuda and bw.get("nominal_Bps"):
        mem_bw = bw["nominal_Bps"]
    for r in rows:
        if "error" in r:
            continue
        hf = [h for h in rows if h["impl"].startswith("hf") and "error" not in h and (h["model"], h["dtype"]) == (r["model"], r["dtype"])]
        for key in ("prefill_tok_s", "decode_tok_s"):
            best = max((h[key] for h in hf), default=None)
            r[key.replace("tok_s", "vs_best_hf")] = r[key] / best if best else None
        ckpt, base = r["checkpoint_bytes"], 0 if cuda else r["rss_before_load"]
        r["load_mem_bytes"] = r["load_peak_allocated" if cuda else "load_peak_rss"] - base
        r["peak_mem_bytes"] = r["peak_allocated" if cuda else "peak_rss"] - base
        r["peak_mem_over_checkpoint"] = r["peak_mem_bytes"] / ckpt
        r["load_mem_over_checkpoint"] = r["load_mem_bytes"] / ckpt
        # Decode reads every weight once per token; the KV cache and activations are left out.
        r["decode_Bps"] = ckpt * r["decode_tok_s"]
        r["fraction_of_memory_bandwidth"] = r["decode_Bps"] / mem_bw
        # The GEMV ceiling of the model itself, measured between its decode runs ...
        r["fraction_of_gemv_ceiling"] = r["decode_Bps"] / r["model_gemv_Bps"]
        r["gemv_ceiling_tok_s"] = r["model_gemv_Bps"] / ckpt
        # ... and of the machine's GEMV probe at the start, for comparison.
        r["fraction_of_machine_gemv_probe"] = r["decode_Bps"] / bw["gemv_Bps"][r["dtype"]] if r["dtype"] in bw["gemv_Bps"] else None
    return mem_bw


def speed_table(rows, device):
    mem = "alloc" if device.startswith("cuda") else "RSS"
    head = ["model", "dtype", "impl", "load s", f"load {mem} MB", f"peak {mem} MB", "peak/ckpt",
            "prefill tok/s", "×HF", "decode tok/s", "×HF", "decode GB/s", "% mem BW", "GEMV ceiling tok/s", "% GEMV"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["model"], r["dtype"], r["impl"], "error: " + r["error"].splitlines()[-1][:80]] + [""] * (len(head) - 4))
            continue
        small = lambda x: ".2f" if x < 10 else ".1f"  # noqa: E731
        lines.append([r["model"], r["dtype"], r["impl"], fmt(r["load_s"], ".2f"), fmt(r["load_mem_bytes"] / 1e6, ".0f"),
                      fmt(r["peak_mem_bytes"] / 1e6, ".0f"), fmt(r["peak_mem_over_checkpoint"], ".2f"),
                      fmt(r["prefill_tok_s"], ".1f"), fmt(r["prefill_vs_best_hf"], ".2f"), fmt(r["decode_tok_s"], small(r["decode_tok_s"])),
                      fmt(r["decode_vs_best_hf"], ".2f"), fmt(r["decode_Bps"] / 1e9, ".2f"),
                      fmt(100 * r["fraction_of_memory_bandwidth"], ".0f"),
                      fmt(r["gemv_ceiling_tok_s"], ".2f" if r["gemv_ceiling_tok_s"] < 10 else ".0f"),
                      fmt(100 * r["fraction_of_gemv_ceiling"], ".0f")])
    return markdown_table(head, lines)


def speed_report(rows, bw, mem_bw, info, args):
    cuda, probe = args.device.startswith("cuda"), bw["bytes"]
    return "\n".join([
        f"# Benchmark: ours against transformers ({args.device})",
        "",
        f"- machine: {describe(info, args.threads)}",
        f"- load average (1 min) {info['load_average_start'][0]:.2f} at the start, {info['load_average_end'][0]:.2f} at the end",
        f"- memory bandwidth {mem_bw / 1e9:.1f} GB/s ("
        + ("data sheet" if cuda and bw.get("nominal_Bps") else "the fastest of the probes below")
        + f"), probed at the start over about {probe / 1e9:.2g} GB: sum/dot {bw['read_Bps'] / 1e9:.1f} GB/s, copy {bw['copy_Bps'] / 1e9:.1f} GB/s "
        "(read + write), batch-1 F.linear over gemma-2b MLP matrices " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw["gemv_Bps"].items())
        + ", torch.mv over the same " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw["mv_Bps"].items()),
        f"- prefill: a {args.prompt_len}-token prompt, time to the first new token; decode: {args.new_tokens} new tokens "
        f"after a {args.decode_prompt_len}-token prompt, batch 1, greedy, tokens/s of the steps after the first; "
        f"median of {args.runs} runs after a warm-up" + (f", median of {args.rounds} alternating rounds" if args.rounds > 1 else ""),
        "- ours: gemma.stream / gemma2.stream (ours-compile: compile=True); transformers: model.generate(do_sample=False, "
        "min_new_tokens=max_new_tokens) with its default DynamicCache, timed per token by a streamer",
        "- memory: " + ("peak allocated on the GPU" if cuda else "peak RSS minus the RSS before loading (after imports)")
        + "; peak/ckpt = that over the checkpoint's bytes; ×HF = over the fastest transformers implementation;"
        " decode GB/s = checkpoint bytes (the tied embedding once) × decode tok/s;"
        " GEMV ceiling = the decode speed if a step took only what batch-1 F.linear over each of the model's weight matrices"
        " takes, measured in the same process between the decode runs; % GEMV = decode tok/s over it",
        "",
        speed_table(rows, args.device),
    ])


# The context sweep


def sweep_table(rows, impls):
    """One line per family and context: decode ms/token, prefill s and GB of each implementation."""
    by = {(r["family"], r["impl"], r["length"]): r for r in rows}
    keys = sorted({(r["family"], r["length"]) for r in rows})
    head = (["family", "context"] + [f"decode ms/token {i}" for i in impls] + ["ours/best HF (decode speed)"]
            + [f"prefill s {i}" for i in impls] + [f"prefill GB {i}" for i in impls])
    lines = []
    for family, length in keys:
        cell = {i: by.get((family, i, length)) for i in impls}
        hf = [r["decode_ms_per_token"] for i, r in cell.items() if r and i.startswith("hf")]
        ours = cell.get("ours")
        lines.append([family, str(length)]
                     + [fmt(r and r["decode_ms_per_token"], ".1f") for r in cell.values()]
                     + [fmt(min(hf) / ours["decode_ms_per_token"] if hf and ours else None, ".2f")]
                     + [fmt(r and r["prefill_s"], ".2f") for r in cell.values()]
                     + [fmt(r and r["prefill_mem_bytes"] / 1e9, ".2f") for r in cell.values()])
    return markdown_table(head, lines)


def sweep_report(rows, impls, shapes, info, args):
    shape = "; ".join(f"{f}: hidden {s['hidden_size']}, {s['num_attention_heads']} heads, {s['num_key_value_heads']} KV head(s), "
                      f"head_dim {s['head_dim']}, ffn {s['intermediate_size']}, {s['num_hidden_layers']} layer(s), vocab {s['vocab_size']}"
                      for f, s in shapes.items())
    errors = [f"- {r['family']} {r['impl']}: error: {r['error'].splitlines()[-1]}" for r in rows if "error" in r]
    return "\n".join([
        f"# Context sweep: ours against transformers ({args.device}, {args.dtypes or 'fp32'})",
        "",
        f"- machine: {describe(info, args.threads)}; load average (1 min) {info['load_average_start'][0]:.2f} "
        f"at the start, {info['load_average_end'][0]:.2f} at the end",
        f"- shapes (random weights): {shape}",
        f"- one generation per context, batch 1, greedy, {args.new_tokens} new tokens: prefill s = time to the first "
        "new token on the host; decode ms/token = time from the first to the last new token / (tokens - 1); "
        "ours/best HF = the faster transformers' ms/token over ours (above 1: ours is faster)",
        "- prefill GB: peak RSS while prefilling (VmHWM reset to the RSS just before, read when the first token reaches "
        "the host) minus the RSS of the loaded model once every weight has been read (both loaders memory-map the file), "
        "so it also counts what a short warm-up generation left resident (tens of MB); every implementation in a fresh "
        "process, contexts in increasing order" + ("; on CUDA: allocated memory instead of RSS" if args.device.startswith("cuda") else ""),
        "",
        sweep_table([r for r in rows if "error" not in r], impls),
        *([""] + errors if errors else []),
    ])


def sweep_plot(rows, impls, shapes, info, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    panels = [("decode_ms_per_token", 1, "decode (ms/token)"), ("prefill_s", 1, "prefill time (s)"),
              ("prefill_mem_bytes", 1e-9, "prefill peak memory above the loaded model (GB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 5))
    colors = {i: f"C{k}" for k, i in enumerate(impls)}
    styles = ["-", "--", ":", "-."]
    families = sorted({r["family"] for r in rows})
    for ax, (key, scale, label) in zip(axes, panels):
        for fi, family in enumerate(families):
            for impl in impls:
                pts = sorted((r["length"], r[key] * scale) for r in rows if (r["family"], r["impl"]) == (family, impl))
                if pts:
                    ax.plot(*zip(*pts), styles[fi % len(styles)], marker="o", color=colors[impl], label=f"{family} {impl}")
        ax.set_xlabel("context: prompt length (tokens)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    widths = "; ".join(f"{f}: hidden {s['hidden_size']}, ffn {s['intermediate_size']}, {s['num_attention_heads']} heads, "
                       f"{s['num_key_value_heads']} KV" for f, s in shapes.items())
    fig.suptitle(f"Context sweep: {args.dtypes or 'fp32'}, batch 1, greedy, {args.new_tokens} new tokens; random weights, "
                 f"{args.layers} layer(s), {widths}\n{describe(info, args.threads)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
