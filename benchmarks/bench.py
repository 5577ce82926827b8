"""Speed and memory of this implementation against transformers, on the same checkpoint.

    python benchmarks/bench.py                                   # CPU: the demos and the gemma-2b shape, fp32 and bf16
    python benchmarks/bench.py --models demo --dtypes fp32 --runs 3 --json /tmp/bench.json
    python benchmarks/bench.py --device cuda                     # CUDA: the five official shapes in bf16

For every model and dtype one Hugging Face checkpoint is written to a temporary
directory with weights.save_hf (the demo's weights, or random weights of a
preset's shape: nothing is downloaded) and deleted afterwards. Every
implementation then loads that same directory in a fresh subprocess, so that
peak memory belongs to one side only, and is measured there:

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
same shapes (which also compiles the compiled path). Tokens are synchronised
to the host every step on both sides (ours: .item(); transformers: its
streamer receives each token on the CPU), and CUDA is synchronised before
every clock reading.

Implementations (--impls):
  ours          gemma.stream / gemma2.stream, eager: the readable path;
  ours-compile  the same with compile=True (torch.compile; CUDA graphs on CUDA);
  hf-eager      transformers AutoModelForCausalLM, attn_implementation="eager",
                model.generate(do_sample=False, max_new_tokens=N,
                min_new_tokens=N) with its default DynamicCache, timed per
                token by a streamer;
  hf-sdpa       the same with "sdpa" (Gemma 1 only: transformers runs Gemma 2
                eagerly because of the attention soft-capping, HF PR #32865).
"""

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMOS = {"gemma-demo": ROOT / "checkpoints" / "gemma-demo", "gemma2-demo": ROOT / "checkpoints" / "gemma2-demo"}
# Random stand-ins with the demos' family, used while (or where) a demo is missing.
TINY = {
    "tiny-gemma": ("gemma", dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024)),
    "tiny-gemma2": ("gemma2", dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                                   query_pre_attn_scalar=64, sliding_window=128)),
}
PRESETS = {"gemma-2b": "gemma", "gemma-7b": "gemma", "gemma-2-2b": "gemma2", "gemma-2-9b": "gemma2", "gemma-2-27b": "gemma2"}
ALIASES = {"demo": ["gemma-demo", "gemma2-demo"], "tiny": list(TINY), "2b": ["gemma-2b"], "presets": list(PRESETS)}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
IMPLS = ["ours", "ours-compile", "hf-eager", "hf-sdpa"]
# Memory bandwidth of the data sheets, for the CUDA devices whose name says which.
NOMINAL_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
                     "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12,
                     "A100-PCIE-40GB": 1.555e12, "L4": 0.3e12, "A10G": 0.6e12}


# Measurements, each run in a subprocess of its own (see child_main)


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def proc_status_bytes(field):
    """VmRSS (resident now) or VmHWM (the high-water mark of the resident set) of this process.

    Not ru_maxrss: Linux carries the parent's resident set over fork and exec
    into the child's ru_maxrss, so it would never read below the parent's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def time_it(fn, device, repeat):
    """Median seconds of fn() over `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth(spec):
    """Bytes/s that the machine reads (a large sum), copies, and streams through batch-1 F.linear."""
    import torch
    import torch.nn.functional as F

    device = spec["device"]
    torch.manual_seed(0)
    size = spec["bytes"]
    x = torch.ones(size // 4, device=device)
    y = torch.empty_like(x)
    out = {
        # Reading: the better of two reductions (torch's sum; a dot product, which
        # the BLAS does), since neither is sure to reach the limit on every machine.
        "read_Bps": max(size / time_it(x.sum, device, 5), size / time_it(lambda: torch.dot(x, x), device, 5)),
        "copy_Bps": 2 * size / time_it(lambda: y.copy_(x), device, 5),  # read + write
        "gemv_Bps": {},
        "mv_Bps": {},  # torch.mv(W, x): the same product by another kernel, for comparison
    }
    del x, y
    # The two large shapes of a gemma-2b layer, gate/up (F, D) and down (D, F),
    # enough of them that they come from DRAM rather than from the caches.
    D, F_ = 2048, 16384
    for name in spec["dtypes"]:
        dtype = getattr(torch, DTYPES[name])
        per = D * F_ * dtype.itemsize
        weights = [torch.randn((F_, D) if i % 2 == 0 else (D, F_), device=device).to(dtype) for i in range(max(2, size // per))]
        inputs = {D: torch.randn(1, D, device=device, dtype=dtype), F_: torch.randn(1, F_, device=device, dtype=dtype)}

        def gemv():
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

        def mv():
            for w in weights:
                torch.mv(w, inputs[w.shape[1]][0])

        out["gemv_Bps"][name] = len(weights) * per / time_it(gemv, device, 5)
        out["mv_Bps"][name] = len(weights) * per / time_it(mv, device, 5)
        del weights
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        out["device_name"] = name
        out["nominal_Bps"] = next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)
    return out


def write_checkpoint(spec):
    """Write an HF checkpoint in spec["dtype"]: the demo's weights, or random ones of a shape."""
    import torch

    import gemma
    import gemma2
    import weights

    dtype = getattr(torch, DTYPES[spec["dtype"]])
    device = spec["device"]
    if spec.get("path"):
        model = weights.load(spec["path"], device="cpu", dtype=dtype, progress=False)
    else:
        module = {"gemma": gemma, "gemma2": gemma2}[spec["family"]]
        if spec.get("preset"):
            config = module.CONFIGS[spec["preset"]]
        else:
            config = (module.GemmaConfig if module is gemma else module.Gemma2Config)(**spec["config"])
        cls = module.GemmaForCausalLM if module is gemma else module.Gemma2ForCausalLM
        with torch.device("meta"):
            model = cls(config)
        # Random weights made where they will be used (the GPU is much faster at
        # it), in the dtype of the file, one tensor at a time.
        model = model.to(dtype).to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.1, generator=g)
                else:  # N(0, 1/fan_in): activations stay O(1) through the layers
                    p.normal_(0.0, p.shape[-1] ** -0.5 if "embed" not in name else 1.0, generator=g)
    weights.save_hf(model, spec["out"])
    tensors = list(model.state_dict().values())
    c = model.config
    return {
        "family": "gemma2" if isinstance(model, gemma2.Gemma2ForCausalLM) else "gemma",
        "params": sum(t.numel() for t in tensors),
        "checkpoint_bytes": sum(t.nbytes for t in tensors),
        "shape": {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "head_dim")},
    }


def prompt_ids(length, vocab, seed):
    """A prompt of `length` ids: <bos> (2) and then random ids past the special ones."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(4, vocab, (length - 1,), generator=g).tolist()


def ours_runner(model, compile, device):
    import gemma
    import gemma2

    family = gemma2 if isinstance(model, gemma2.Gemma2ForCausalLM) else gemma

    def run(prompt, n):
        """(start, [time of each new token]) of one generation of n tokens."""
        times = []
        sync(device)
        start = time.perf_counter()
        for token in family.stream(model, [prompt], n, compile=compile):
            token.item()  # on the host, as generate() needs it
            times.append(time.perf_counter())
        return start, times

    return run


def hf_runner(model, device):
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Records when generate hands over the prompt and then each new token."""

        def __init__(self):
            self.times = []

        def put(self, value):
            sync(device)
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(prompt, n):
        ids = torch.tensor([prompt], device=device)
        clock = Clock()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, streamer=clock)
        return clock.times[0], clock.times[1:]  # the first put is the prompt

    return run


def weight_matrices(model):
    """Every 2-D parameter once (the tied LM head is the embedding)."""
    seen, out = set(), []
    for p in model.parameters():
        if p.dim() == 2 and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out.append(p)
    return out


def gemv_pass(matrices):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        inputs = {}
        for w in matrices:
            x = inputs.setdefault(w.shape[1], torch.ones(1, 1, w.shape[1], dtype=w.dtype, device=w.device))
            F.linear(x, w)


def run_impl(spec):
    """Load the checkpoint with one implementation and time prefill and decode."""
    import torch

    impl, device, path = spec["impl"], spec["device"], spec["checkpoint"]
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if impl.startswith("hf"):
        import transformers

        transformers.logging.set_verbosity_error()
    import weights  # noqa: F401  (imports gemma, gemma2: part of "our" baseline, as transformers is of theirs)

    # Start the thread pools and math libraries before the baseline: their memory
    # is the same for both sides and is not the model's.
    x = torch.ones(64, 64, dtype=dtype, device=device)
    (x @ x).sum().item()
    del x
    gc.collect()
    rss0 = proc_status_bytes("VmRSS")
    sync(device)
    start = time.perf_counter()
    notes = []
    if impl.startswith("ours"):
        model = weights.load(path, device=device, dtype=dtype, progress=False)
        run = ours_runner(model, impl == "ours-compile", device)
    else:
        attn = impl.removeprefix("hf-")
        auto = transformers.AutoModelForCausalLM
        if device == "cpu":
            model = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        else:
            try:
                model = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn, device_map=device)
            except (ImportError, ValueError) as e:  # device_map may need accelerate
                notes.append(f"device_map unavailable ({type(e).__name__}); loaded on the CPU, then .to({device})")
                model = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)
        model.eval()
        run = hf_runner(model, device)
    sync(device)
    load_s = time.perf_counter() - start
    result = {"load_s": load_s, "rss_before_load": rss0, "load_peak_rss": proc_status_bytes("VmHWM")}
    if device.startswith("cuda"):
        result["load_peak_allocated"] = torch.cuda.max_memory_allocated()

    vocab = spec["vocab_size"]
    # Prefill: time to the first new token.
    long_prompt = prompt_ids(spec["prompt_len"], vocab, seed=1)
    prefill = []
    for i in range(1 + spec["runs"]):
        t0, times = run(long_prompt, 1)
        if i > 0:  # the first run is the warm-up
            prefill.append(len(long_prompt) / (times[0] - t0))
    # Decode: the steps after the first new token.
    short_prompt = prompt_ids(spec["decode_prompt_len"], vocab, seed=2)
    n = spec["new_tokens"]
    # Between decode runs, the GEMV ceiling of this very model: one batch-1
    # F.linear over each of its weight matrices, the same tensors in the same
    # memory, which is all that decode has to stream. Measured in turn with
    # decode, so that both see the same machine (other jobs, other VMs).
    matrices = weight_matrices(model)
    gemv_bytes = sum(w.nbytes for w in matrices)
    decode, step_ms, gemv = [], [], []
    for i in range(1 + spec["runs"]):
        t0, times = run(short_prompt, n)
        assert len(times) == n, f"{impl} made {len(times)} tokens, not {n}"
        if i > 0:
            decode.append((n - 1) / (times[-1] - times[0]))
            step_ms.append(1e3 * statistics.median(b - a for a, b in zip(times, times[1:])))
        gemv.append(gemv_bytes / time_it(lambda: gemv_pass(matrices), device, 3))
    result.update(
        prefill_tok_s=statistics.median(prefill),
        prefill_runs=prefill,
        decode_tok_s=statistics.median(decode),
        decode_runs=decode,
        decode_median_step_ms=statistics.median(step_ms),
        model_gemv_Bps=statistics.median(gemv),
        model_gemv_runs=gemv,
        model_weight_bytes=gemv_bytes,
        peak_rss=proc_status_bytes("VmHWM"),
        notes=notes,
    )
    if device.startswith("cuda"):
        result["peak_allocated"] = torch.cuda.max_memory_allocated()
    return result


def child_main(spec):
    task = {"bandwidth": bandwidth, "write": write_checkpoint, "run": run_impl}[spec["task"]]
    print("RESULT " + json.dumps(task(spec)), flush=True)


# The parent: which runs, in which order, and the report


def child(spec, timeout=None):
    """Run one task in a fresh Python; its result, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}: " + "\n".join(tail)}
    return json.loads(lines[-1].removeprefix("RESULT "))


def read_through(directory):
    """Read every file once, so that each loader finds the checkpoint in the page cache."""
    for path in Path(directory).iterdir():
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def expand_models(names, device):
    """[(name, write spec)] for --models; a missing demo becomes its random tiny stand-in."""
    out = []
    for name in names:
        for m in ALIASES.get(name, [name]):
            if m in DEMOS:
                if (DEMOS[m] / "config.json").is_file():
                    out.append((m, {"path": str(DEMOS[m])}))
                else:
                    tiny = "tiny-" + m.removesuffix("-demo")
                    print(f"note: {DEMOS[m]} does not exist (yet); using {tiny}, random weights of a small shape", file=sys.stderr)
                    out.append((tiny, {"family": TINY[tiny][0], "config": TINY[tiny][1]}))
            elif m in TINY:
                out.append((m, {"family": TINY[m][0], "config": TINY[m][1]}))
            elif m in PRESETS:
                out.append((m, {"family": PRESETS[m], "preset": m}))
            else:
                sys.exit(f"error: unknown model {m!r}; use {sorted(set(ALIASES) | set(DEMOS) | set(TINY) | set(PRESETS))}")
    return out


def machine_info(device):
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def derive(rows, bw, device):
    """Ratios to transformers and the fraction of the bandwidth limits, in place."""
    # Every probe reads memory at some rate the memory can sustain, so the
    # fastest of them is the best estimate of the limit (on this VM a batch-1
    # GEMV outruns torch's sum). On CUDA the data sheet's figure where known.
    probes = [bw["read_Bps"], *bw["gemv_Bps"].values(), *bw["mv_Bps"].values()]
    mem_bw = bw.get("nominal_Bps") or max(probes) if device.startswith("cuda") else max(probes)
    for r in rows:
        if "error" in r:
            continue
        hf = [h for h in rows if h["impl"].startswith("hf") and "error" not in h and (h["model"], h["dtype"]) == (r["model"], r["dtype"])]
        for key in ("prefill_tok_s", "decode_tok_s"):
            best = max((h[key] for h in hf), default=None)
            r[key.replace("tok_s", "vs_best_hf")] = r[key] / best if best else None
        ckpt = r["checkpoint_bytes"]
        mem_key = "peak_allocated" if device.startswith("cuda") else "peak_rss"
        load_key = "load_peak_allocated" if device.startswith("cuda") else "load_peak_rss"
        base = 0 if device.startswith("cuda") else r["rss_before_load"]
        r["load_mem_bytes"] = r[load_key] - base
        r["peak_mem_bytes"] = r[mem_key] - base
        r["peak_mem_over_checkpoint"] = r["peak_mem_bytes"] / ckpt
        r["load_mem_over_checkpoint"] = r["load_mem_bytes"] / ckpt
        # Decode reads every weight once per token; the KV cache and activations are left out.
        r["decode_Bps"] = ckpt * r["decode_tok_s"]
        r["fraction_of_memory_bandwidth"] = r["decode_Bps"] / mem_bw
        # The GEMV ceiling of the model itself, measured between its decode runs.
        r["fraction_of_gemv_ceiling"] = r["decode_Bps"] / r["model_gemv_Bps"]
        r["gemv_ceiling_tok_s"] = r["model_gemv_Bps"] / ckpt
        # ... and of the machine's GEMV probe at the start, for comparison.
        r["fraction_of_machine_gemv_probe"] = r["decode_Bps"] / bw["gemv_Bps"][r["dtype"]] if r["dtype"] in bw["gemv_Bps"] else None
    return mem_bw


def table(rows, device):
    mem = "alloc" if device.startswith("cuda") else "RSS"
    head = ["model", "dtype", "impl", "load s", f"load {mem} MB", f"peak {mem} MB", "peak/ckpt",
            "prefill tok/s", "×HF", "decode tok/s", "×HF", "decode GB/s", "% mem BW", "GEMV ceiling tok/s", "% GEMV"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(x, spec):
        return "–" if x is None else format(x, spec)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['impl']} | error: {r['error'].splitlines()[-1][:80]} |" + " |" * (len(head) - 4))
            continue
        cells = [r["model"], r["dtype"], r["impl"], f(r["load_s"], ".2f"), f(r["load_mem_bytes"] / 1e6, ".0f"),
                 f(r["peak_mem_bytes"] / 1e6, ".0f"), f(r["peak_mem_over_checkpoint"], ".2f"),
                 f(r["prefill_tok_s"], ".1f"), f(r["prefill_vs_best_hf"], ".2f"), f(r["decode_tok_s"], ".2f" if r["decode_tok_s"] < 10 else ".1f"),
                 f(r["decode_vs_best_hf"], ".2f"), f(r["decode_Bps"] / 1e9, ".2f"),
                 f(100 * r["fraction_of_memory_bandwidth"], ".0f"), f(r["gemv_ceiling_tok_s"], ".2f" if r["gemv_ceiling_tok_s"] < 10 else ".0f"),
                 f(100 * r["fraction_of_gemv_ceiling"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Speed and memory: this implementation against transformers.")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--models", default=None,
                   help="comma list of demo, tiny, 2b, presets or names (gemma-demo, gemma2-demo, tiny-gemma, tiny-gemma2, "
                        + ", ".join(PRESETS) + "); default: demo,2b on CPU, presets on CUDA")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16; default: fp32,bf16 on CPU, bf16 on CUDA")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each measurement, after one warm-up")
    p.add_argument("--rounds", type=int, default=1,
                   help="load and measure every implementation this many times, alternating them; the median round is reported")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for prefill")
    p.add_argument("--decode-prompt-len", type=int, default=16, help="prompt tokens before the decode steps")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per decode run (batch 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: torch's choice)")
    p.add_argument("--bandwidth-bytes", type=float, default=None, help="size of the bandwidth probes (default 1 GB CPU, 4 GB CUDA)")
    p.add_argument("--tmp", default=None, help="where to write the temporary checkpoints (default: the system's)")
    p.add_argument("--timeout", type=int, default=None, help="seconds allowed to one child")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--md", default=None, help="write the printed report (markdown) here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))

    cuda = args.device.startswith("cuda")
    models = expand_models((args.models or ("presets" if cuda else "demo,2b")).split(","), args.device)
    dtypes = (args.dtypes or ("bf16" if cuda else "fp32,bf16")).split(",")
    impls = args.impls.split(",")
    for x in dtypes:
        if x not in DTYPES:
            sys.exit(f"error: unknown dtype {x!r}; use {', '.join(DTYPES)}")
    for x in impls:
        if x not in IMPLS:
            sys.exit(f"error: unknown implementation {x!r}; use {', '.join(IMPLS)}")

    info = machine_info(args.device)
    print(f"machine: {info['cpu']}, {info['cpu_cores']} cores, {info['ram_bytes'] / 2**30:.0f} GiB"
          + (f", {info['gpu']}" if cuda else "") + f"; torch {info['torch']}, transformers {info['transformers']}; "
          f"load average {info['load_average_start'][0]:.2f}", file=sys.stderr)
    probe = int(args.bandwidth_bytes or (4e9 if cuda else 1e9))
    bw = child({"task": "bandwidth", "device": args.device, "dtypes": dtypes, "bytes": probe})
    if "error" in bw:
        sys.exit(f"error: bandwidth probe failed: {bw['error']}")
    print(f"bandwidth: read {bw['read_Bps'] / 1e9:.1f} GB/s, copy {bw['copy_Bps'] / 1e9:.1f} GB/s (read + write), GEMV "
          + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw["gemv_Bps"].items()), file=sys.stderr)

    rows = []
    common = {k: getattr(args, k) for k in ("runs", "prompt_len", "decode_prompt_len", "new_tokens", "threads")}
    for name, source in models:
        for dtype in dtypes:
            tmp = tempfile.mkdtemp(prefix=f"bench-{name}-{dtype}-", dir=args.tmp)
            try:
                t = time.perf_counter()
                ckpt = child({"task": "write", "device": args.device, "dtype": dtype, "out": tmp, **source}, args.timeout)
                if "error" in ckpt:
                    print(f"{name} {dtype}: could not write the checkpoint: {ckpt['error']}", file=sys.stderr)
                    rows.append({"model": name, "dtype": dtype, "impl": "all", "error": ckpt["error"]})
                    continue
                print(f"{name} {dtype}: {ckpt['params'] / 1e6:.1f}M parameters, {ckpt['checkpoint_bytes'] / 1e9:.2f} GB "
                      f"written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
                todo = [i for i in impls if not (i == "hf-sdpa" and ckpt["family"] == "gemma2")]
                rounds = {i: [] for i in todo}
                for rnd in range(args.rounds):
                    order = todo if rnd % 2 == 0 else todo[::-1]
                    for impl in order:
                        spec = {"task": "run", "impl": impl, "device": args.device, "dtype": dtype, "checkpoint": tmp,
                                "vocab_size": ckpt["shape"]["vocab_size"], **common}
                        read_through(tmp)
                        t = time.perf_counter()
                        r = child(spec, args.timeout)
                        took = time.perf_counter() - t
                        if "error" in r:
                            print(f"  {impl}: error: {r['error']}", file=sys.stderr)
                        else:
                            print(f"  {impl}: load {r['load_s']:.2f} s, prefill {r['prefill_tok_s']:.1f} tok/s, "
                                  f"decode {r['decode_tok_s']:.2f} tok/s ({took:.0f} s)", file=sys.stderr)
                        rounds[impl].append(r)
                for impl in todo:
                    ok = [r for r in rounds[impl] if "error" not in r]
                    if not ok:
                        rows.append({"model": name, "dtype": dtype, "impl": impl, "error": rounds[impl][0]["error"]})
                        continue
                    ok.sort(key=lambda r: r["decode_tok_s"])
                    best = dict(ok[(len(ok) - 1) // 2])  # the median round by decode speed
                    best["rounds"] = [{k: r[k] for k in ("load_s", "prefill_tok_s", "decode_tok_s", "peak_rss")} for r in rounds[impl] if "error" not in r]
                    rows.append({"model": name, "dtype": dtype, "impl": impl, **ckpt, **best})
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    mem_bw = derive(rows, bw, args.device)
    info["load_average_end"] = os.getloadavg()
    report = [
        f"# Benchmark: ours against transformers ({args.device})",
        "",
        f"- machine: {info['cpu']}, {info['cpu_cores']} cores, {info['ram_bytes'] / 2**30:.0f} GiB RAM"
        + (f", {info['gpu']}" if cuda else "") + f"; torch {info['torch']}, transformers {info['transformers']}, "
        f"{info['torch_threads'] if not args.threads else args.threads} torch threads",
        f"- load average (1 min) {info['load_average_start'][0]:.2f} at the start, {info['load_average_end'][0]:.2f} at the end",
        f"- memory bandwidth {mem_bw / 1e9:.1f} GB/s ("
        + ("data sheet" if cuda and bw.get("nominal_Bps") else "the fastest of the probes below")
        + f"), probed at the start over about {probe / 1e9:.0f} GB: sum/dot {bw['read_Bps'] / 1e9:.1f} GB/s, copy {bw['copy_Bps'] / 1e9:.1f} GB/s "
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
        table(rows, args.device),
    ]
    text = "\n".join(report)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "bandwidth": bw, "memory_bandwidth_Bps": mem_bw,
                                               "settings": {**common, "rounds": args.rounds, "device": args.device},
                                               "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
