"""Speed and memory of this implementation against transformers, on the same checkpoint.

    python benchmarks/bench.py                                   # CPU: the demos and the gemma-2b shape, fp32 and bf16
    python benchmarks/bench.py --models demo --dtypes fp32 --runs 3 --json /tmp/bench.json
    python benchmarks/bench.py --device cuda                     # CUDA: the five official shapes in bf16
    python benchmarks/bench.py --sweep                           # decode and prefill against the context length

For every model and dtype one Hugging Face checkpoint is written to a temporary
directory with weights.save_hf (the demo's weights, or random weights of a
preset's shape: nothing is downloaded) and deleted afterwards. Every
implementation (impls.py) then loads that same directory in a fresh subprocess,
so that peak memory belongs to one side only, and is measured there
(harness.py); report.py writes the tables and the plot.

The speed table (the default):
  load       seconds to a ready model (the files are read through just before,
             so they are in the page cache: this times the loader, not the disk);
  memory     CPU: peak RSS minus the RSS before loading (after the imports), at
             the end of loading and at the end of the run; CUDA: peak allocated;
  prefill    tokens/s to the first new token for a --prompt-len prompt;
  decode     tokens/s of the --new-tokens - 1 steps after the first new token,
             batch 1, after a --decode-prompt-len prompt, greedy;
  bandwidth  decode's weight bytes per token (every parameter once: the tied
             embedding is read once, as the LM head) times tokens/s, as a
             fraction of the machine's memory bandwidth (the fastest of the
             probes run at the start: sum, dot, batch-1 F.linear and torch.mv
             over about 1 GB) and of the GEMV ceiling: what one batch-1
             F.linear over each of the model's own weight matrices streams,
             measured in the same process in turn with the decode runs (the
             bandwidth of this VM drifts with its neighbours' load).
Prefill and decode are the median of --runs runs after one warm-up run of the
same shapes (which also compiles the compiled path).

The context sweep (--sweep): each family at the layer widths of one official
model (SWEEP_PRESETS) with --layers layers and a 4096-token vocabulary; for
each --lengths prompt, in increasing order, one generation of --new-tokens
tokens after a short warm-up: prefill seconds (to the first new token), the
prefill's peak RSS above the RSS of the loaded model with every weight read
(VmHWM reset just before the prefill, read when the first token reaches the
host), and decode ms/token over the tokens after the first.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import harness
import impls
import report
from harness import DTYPES, ROOT, child, families, read_through
from impls import IMPLS, impls_for

DEMOS = {"gemma-demo": ROOT / "checkpoints" / "gemma-demo", "gemma2-demo": ROOT / "checkpoints" / "gemma2-demo"}
# Random stand-ins with the demos' family, used while (or where) a demo is missing.
TINY = {
    "tiny-gemma": ("gemma", dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024)),
    "tiny-gemma2": ("gemma2", dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                                   query_pre_attn_scalar=64, sliding_window=128)),
}
PRESETS = {name: family for family, module in families().items() for name in module.CONFIGS}  # gemma-2b -> gemma, ...
ALIASES = {"demo": ["gemma-demo", "gemma2-demo"], "tiny": list(TINY), "2b": ["gemma-2b"], "presets": list(PRESETS)}
# The context sweep: the official model whose layer widths each family uses.
SWEEP_PRESETS = {"gemma": "gemma-2b", "gemma2": "gemma-2-2b", "gemma3_text": "gemma-3-1b"}
SWEEP_TINY = dict(hidden_size=256, intermediate_size=1024, head_dim=64, query_pre_attn_scalar=64)  # --widths tiny


def expand_models(names):
    """[(name, write spec)] for --models; a missing demo becomes its random tiny stand-in."""
    out = []
    for name in names:
        for m in ALIASES.get(name, [name]):
            if m in DEMOS and (DEMOS[m] / "config.json").is_file():
                out.append((m, {"path": str(DEMOS[m])}))
                continue
            if m in DEMOS:
                tiny = "tiny-" + m.removesuffix("-demo")
                print(f"note: {DEMOS[m]} does not exist (yet); using {tiny}, random weights of a small shape", file=sys.stderr)
                m = tiny
            if m in TINY:
                out.append((m, {"family": TINY[m][0], "config": TINY[m][1]}))
            elif m in PRESETS:
                out.append((m, {"family": PRESETS[m], "preset": m}))
            else:
                sys.exit(f"error: unknown model {m!r}; use {sorted(set(ALIASES) | set(DEMOS) | set(TINY) | set(PRESETS))}")
    return out


@contextlib.contextmanager
def checkpoint(name, source, dtype, args):
    """(directory, description or {"error": ...}) of a checkpoint written to a
    temporary directory for the time of the block."""
    tmp = tempfile.mkdtemp(prefix=f"bench-{name}-{dtype}-", dir=args.tmp)
    try:
        t = time.perf_counter()
        ckpt = child({"task": "write", "device": args.device, "dtype": dtype, "out": tmp, **source}, args.timeout)
        if "error" in ckpt:
            print(f"{name} {dtype}: could not write the checkpoint: {ckpt['error']}", file=sys.stderr)
        else:
            print(f"{name} {dtype}: {ckpt['params'] / 1e6:.1f}M parameters, {ckpt['checkpoint_bytes'] / 1e9:.2f} GB "
                  f"written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        yield tmp, ckpt
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(spec, path, ckpt, args):
    """One implementation on one checkpoint, in a fresh process, from the page cache."""
    read_through(path)
    t = time.perf_counter()
    spec = {**spec, "checkpoint": path, "device": args.device, "vocab_size": ckpt["shape"]["vocab_size"], "threads": args.threads}
    r = child(spec, args.timeout)
    speeds = f", prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.2f} tok/s" if "decode_tok_s" in r else ""
    print(f"  {spec['impl']}: " + (f"error: {r['error']}" if "error" in r else f"load {r['load_s']:.2f} s{speeds}")
          + f" ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    return r


def speed(args, info):
    """The speed table: every model, dtype and implementation."""
    cuda = args.device.startswith("cuda")
    models = expand_models((args.models or ("presets" if cuda else "demo,2b")).split(","))
    dtypes = (args.dtypes or ("bf16" if cuda else "fp32,bf16")).split(",")
    bw = child({"task": "bandwidth", "device": args.device, "dtypes": dtypes, "bytes": int(args.bandwidth_bytes or (4e9 if cuda else 1e9))})
    if "error" in bw:
        sys.exit(f"error: bandwidth probe failed: {bw['error']}")
    print(f"bandwidth: read {bw['read_Bps'] / 1e9:.1f} GB/s, copy {bw['copy_Bps'] / 1e9:.1f} GB/s (read + write), GEMV "
          + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw["gemv_Bps"].items()), file=sys.stderr)
    rows = []
    common = {k: getattr(args, k) for k in ("runs", "prompt_len", "decode_prompt_len", "new_tokens")}
    for name, source in models:
        for dtype in dtypes:
            with checkpoint(name, source, dtype, args) as (path, ckpt):
                if "error" in ckpt:
                    rows.append({"model": name, "dtype": dtype, "impl": "all", "error": ckpt["error"]})
                    continue
                todo = impls_for(ckpt["family"], args.impls)
                rounds = {i: [] for i in todo}
                for rnd in range(args.rounds):  # alternate the order, for the neighbours' load to fall on both sides
                    for impl in todo if rnd % 2 == 0 else todo[::-1]:
                        rounds[impl].append(run({"task": "run", "impl": impl, "dtype": dtype, **common}, path, ckpt, args))
            for impl in todo:
                ok = sorted((r for r in rounds[impl] if "error" not in r), key=lambda r: r["decode_tok_s"])
                if not ok:
                    rows.append({"model": name, "dtype": dtype, "impl": impl, "error": rounds[impl][0]["error"]})
                    continue
                keep = ("load_s", "prefill_tok_s", "decode_tok_s", "peak_rss")
                median = {**ok[(len(ok) - 1) // 2], "rounds": [{k: r[k] for k in keep} for r in ok]}
                rows.append({"model": name, "dtype": dtype, "impl": impl, **ckpt, **median})
    mem_bw = report.derive(rows, bw, args.device)
    info["load_average_end"] = os.getloadavg()
    data = {"machine": info, "bandwidth": bw, "memory_bandwidth_Bps": mem_bw, "results": rows,
            "settings": {**common, "threads": args.threads, "rounds": args.rounds, "device": args.device}}
    report.save(report.speed_report(rows, bw, mem_bw, info, args), data, args.md, args.json)


def sweep(args, info):
    """The context sweep: every family and implementation at every prompt length."""
    lengths = sorted(int(x) for x in args.lengths.split(","))
    dtype = args.dtypes or "fp32"
    overrides = {"vocab_size": 4096, "num_hidden_layers": args.layers,
                 "max_position_embeddings": max(8192, lengths[-1] + args.new_tokens)}
    known, names = families(), args.families.split(",")
    for family in names:
        if family not in known or family not in SWEEP_PRESETS:
            sys.exit(f"error: unknown family {family!r}; use {', '.join(f for f in SWEEP_PRESETS if f in known)}")
    rows, shapes = [], {}
    for family in names:
        tiny = {k: v for k, v in SWEEP_TINY.items() if hasattr(known[family].CONFIGS[SWEEP_PRESETS[family]], k)}
        source = {"family": family, "preset": SWEEP_PRESETS[family], "overrides": {**overrides, **(tiny if args.widths == "tiny" else {})}}
        with checkpoint(family, source, dtype, args) as (path, ckpt):
            if "error" in ckpt:
                rows.append({"family": family, "impl": "all", "error": ckpt["error"]})
                continue
            shapes[family] = ckpt["shape"]
            for impl in impls_for(family, args.impls):
                r = run({"task": "sweep", "impl": impl, "dtype": dtype, "lengths": lengths, "new_tokens": args.new_tokens}, path, ckpt, args)
                if "error" in r:
                    rows.append({"family": family, "impl": impl, "error": r["error"]})
                    continue
                for x in r.pop("lengths"):
                    print(f"    {x['length']:>5} tokens: prefill {x['prefill_s']:.2f} s, {x['prefill_mem_bytes'] / 1e9:.2f} GB; "
                          f"decode {x['decode_ms_per_token']:.1f} ms/token", file=sys.stderr)
                    rows.append({"family": family, "impl": impl, **r, **x})
    info["load_average_end"] = os.getloadavg()
    data = {"machine": info, "shapes": shapes, "results": rows,
            "settings": {"lengths": lengths, "new_tokens": args.new_tokens, "dtype": dtype, "threads": args.threads, "device": args.device}}
    report.save(report.sweep_report(rows, args.impls, shapes, info, args), data, args.md, args.json)
    plot = args.plot or str(Path(__file__).with_name(f"context-sweep-{args.device.split(':')[0]}.png"))
    report.sweep_plot(rows, args.impls, shapes, info, args, plot)
    print(f"plot: {plot}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description="Speed and memory: this implementation against transformers.")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--models", default=None,
                   help="comma list of demo, tiny, 2b, presets or names (gemma-demo, gemma2-demo, tiny-gemma, tiny-gemma2, "
                        + ", ".join(PRESETS) + "); default: demo,2b on CPU, presets on CUDA")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16; default: fp32,bf16 on CPU, bf16 on CUDA; "
                                                  "one of them for --sweep (default fp32)")
    p.add_argument("--impls", default=None, help=f"comma list of {', '.join(IMPLS)}; default: all, or ours,hf-eager,hf-sdpa for --sweep")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each measurement, after one warm-up")
    p.add_argument("--rounds", type=int, default=1,
                   help="load and measure every implementation this many times, alternating them; the median round is reported")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for prefill")
    p.add_argument("--decode-prompt-len", type=int, default=16, help="prompt tokens before the decode steps")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per decode run, batch 1 (default 128; 32 for --sweep)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: torch's choice)")
    p.add_argument("--bandwidth-bytes", type=float, default=None, help="size of the bandwidth probes (default 1 GB CPU, 4 GB CUDA)")
    p.add_argument("--tmp", default=None, help="where to write the temporary checkpoints (default: the system's)")
    p.add_argument("--timeout", type=int, default=None, help="seconds allowed to one child")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--md", default=None, help="write the printed report (markdown) here")
    s = p.add_argument_group("context sweep")
    s.add_argument("--sweep", action="store_true", help="decode ms/token, prefill time and memory against the prompt length")
    s.add_argument("--lengths", default="256,1024,2048,4096,6000,8000", help="comma list of prompt lengths")
    s.add_argument("--families", default="gemma,gemma2", help="comma list of config.json model_types: " + ", ".join(SWEEP_PRESETS))
    s.add_argument("--layers", type=int, default=2, help="decoder layers of the sweep's models")
    s.add_argument("--widths", choices=["real", "tiny"], default="real",
                   help="real: the widths of " + ", ".join(SWEEP_PRESETS.values()) + "; tiny: hidden 256, ffn 1024, head_dim 64 (a quick check)")
    s.add_argument("--plot", default=None, help="the sweep's PNG (default benchmarks/context-sweep-DEVICE.png)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        task = {"bandwidth": harness.bandwidth, "write": harness.write_checkpoint, "run": impls.run_impl, "sweep": impls.sweep_impl}
        print("RESULT " + json.dumps(task[spec["task"]](spec)), flush=True)
        return

    args.impls = (args.impls or ("ours,hf-eager,hf-sdpa" if args.sweep else ",".join(IMPLS))).split(",")
    args.new_tokens = args.new_tokens or (32 if args.sweep else 128)
    for x in args.impls:
        if x not in IMPLS:
            sys.exit(f"error: unknown implementation {x!r}; use {', '.join(IMPLS)}")
    dtypes = (args.dtypes or "fp32").split(",")
    if any(x not in DTYPES for x in dtypes) or (args.sweep and len(dtypes) > 1):
        sys.exit(f"error: --dtypes {args.dtypes}: use " + ("one of " if args.sweep else "") + ", ".join(DTYPES))
    info = harness.machine_info(args.device)
    print(f"machine: {harness.describe(info, args.threads)}; load average {info['load_average_start'][0]:.2f}", file=sys.stderr)
    (sweep if args.sweep else speed)(args, info)


if __name__ == "__main__":
    main()
