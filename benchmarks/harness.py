"""The measuring tools of bench.py: clocks, memory probes, the machine, child processes, checkpoints.

Every measurement runs in a Python process of its own (child), so that the
memory it reads belongs to one implementation only.
"""

import dataclasses
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# config.json "model_type" -> our module. One line per family; a module that
# does not exist (yet) is left out, and nothing else changes.
FAMILY_MODULES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
# Memory bandwidth of the data sheets, for the CUDA devices whose name says which.
NOMINAL_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
                     "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12,
                     "A100-PCIE-40GB": 1.555e12, "L4": 0.3e12, "A10G": 0.6e12}


def families():
    """{model_type: module} of the families whose module can be imported."""
    out = {}
    for model_type, name in FAMILY_MODULES.items():
        try:
            out[model_type] = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but something it imports does not
                raise
    return out


# Clocks and memory


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


def proc_status_bytes(field):
    """VmRSS (resident now) or VmHWM (the high-water mark of the resident set) of this process.

    Not ru_maxrss: Linux carries the parent's resident set over fork and exec
    into the child's ru_maxrss, so it would never read below the parent's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss():
    """Set VmHWM back to the current RSS (Linux >= 4.0, proc(5) /proc/pid/clear_refs); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bandwidth(spec):
    """Bytes/s that the machine reads (a large sum), copies, and streams through batch-1 F.linear."""
    device, size = spec["device"], spec["bytes"]
    torch.manual_seed(0)
    x = torch.ones(size // 4, device=device)
    y = torch.empty_like(x)
    out = {
        # Reading: the better of two reductions (torch's sum; a dot product, which
        # the BLAS does), since neither is sure to reach the limit on every machine.
        "read_Bps": max(size / time_it(x.sum, device, 5), size / time_it(lambda: torch.dot(x, x), device, 5)),
        "copy_Bps": 2 * size / time_it(lambda: y.copy_(x), device, 5),  # read + write
        "gemv_Bps": {},
        "mv_Bps": {},  # torch.mv(W, x): the same product by another kernel, for comparison
        "bytes": size,
    }
    del x, y
    # The two large shapes of a gemma-2b layer, gate/up (F, D) and down (D, F),
    # enough of them that they come from DRAM rather than from the caches.
    D, F_ = 2048, 16384
    for name in spec["dtypes"]:
        dtype = DTYPES[name]
        per = D * F_ * dtype.itemsize
        weights = [torch.randn((F_, D) if i % 2 == 0 else (D, F_), device=device).to(dtype) for i in range(max(2, size // per))]
        inputs = {D: torch.randn(1, D, device=device, dtype=dtype), F_: torch.randn(1, F_, device=device, dtype=dtype)}
        out["gemv_Bps"][name] = len(weights) * per / time_it(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], device, 5)
        out["mv_Bps"][name] = len(weights) * per / time_it(lambda: [torch.mv(w, inputs[w.shape[1]][0]) for w in weights], device, 5)
        del weights
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        out["device_name"] = name
        out["nominal_Bps"] = next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)
    return out


def machine_info(device):
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


def describe(info, threads=None):
    """One line naming the machine and the software."""
    return (f"{info['cpu']}, {info['cpu_cores']} cores, {info['ram_bytes'] / 2**30:.0f} GiB RAM"
            + (f", {info['gpu']}" if "gpu" in info else "") + f"; torch {info['torch']}, transformers {info['transformers']}, "
            f"{threads or info['torch_threads']} torch threads")


# Child processes


def child(spec, timeout=None):
    """Run one task of bench.py in a fresh Python; its result, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).with_name("bench.py")), "--child", json.dumps(spec)]
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


# Checkpoints


def write_checkpoint(spec):
    """Write an HF checkpoint in spec["dtype"] to spec["out"]: the weights at spec["path"],
    or random ones of a shape: spec["config"] (a config.json dict), or the preset
    spec["preset"] of family spec["family"] with spec["overrides"] applied."""
    import weights

    dtype, device = DTYPES[spec["dtype"]], spec["device"]
    if spec.get("path"):
        model = weights.load(spec["path"], device="cpu", dtype=dtype, progress=False)
    else:
        config = spec.get("config") or dataclasses.asdict(families()[spec["family"]].CONFIGS[spec["preset"]])
        config = {**config, **spec.get("overrides", {}), "model_type": spec["family"]}
        if "layer_types" in config and len(config["layer_types"] or ()) != config["num_hidden_layers"]:
            config["layer_types"] = None  # the family's default pattern for the new depth
        # Random weights made where they will be used (the GPU is much faster at
        # it), in the dtype of the file, one tensor at a time.
        model = weights.build(config, "bench").to(dtype).to_empty(device=device)
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
        "family": json.loads((Path(spec["out"]) / "config.json").read_text())["model_type"],
        "params": sum(t.numel() for t in tensors),
        "checkpoint_bytes": sum(t.nbytes for t in tensors),
        "shape": {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "head_dim")},
    }


def prompt_ids(length, vocab, seed):
    """A prompt of `length` ids: <bos> (2) and then random ids past the special ones."""
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(4, vocab, (length - 1,), generator=g).tolist()
