"""Peak memory of loading a gemma-2b-sized checkpoint: weights.load against transformers.

Writes a Hugging Face checkpoint of the gemma-2b shapes (gemma.CONFIGS["gemma-2b"],
2.5 B parameters: 5.0 GB in bf16, 10.0 GB in float32) into a temporary directory,
tensor by tensor so that this process never holds it, then loads it in a fresh
child process per case. Each child imports torch and the loader (its baseline,
reported apart), loads, and then reads every parameter once, because a tensor
that weights.load leaves in the memory-mapped file becomes resident only when
used: "peak in use" is the honest figure for a model that runs.

The peak is the child's VmHWM (/proc/self/status), the high-water mark of its
resident set. Not ru_maxrss: Linux carries the parent's resident set over fork
and exec into the child's ru_maxrss, so it can never read below this script.

    python benchmarks/load_memory.py [--no-float32] [--dir DIR] [--json OUT.json]

The checkpoint is deleted afterwards. The values are random (the memory does not
depend on them). Load times are with the file read through once just before, so
that it is in the page cache (the kernel's, not the process's) for every loader.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gemma  # noqa: E402
import weights  # noqa: E402

CHILD = r"""
import json, re, sys, time
import torch

def status(field):  # bytes, from /proc/self/status
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

loader, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
torch.empty(1, device="meta").normal_()  # a one-off ~75 MB: torch imports its meta kernels
if loader == "weights.load":
    import weights
else:
    import transformers
    transformers.logging.set_verbosity_error()
baseline = status("VmRSS")
start = time.perf_counter()
if loader == "weights.load":
    model = weights.load(path, device="cpu", dtype=dtype, progress=False)
else:
    model = transformers.GemmaForCausalLM.from_pretrained(path, dtype=dtype)
seconds = time.perf_counter() - start
peak_load = status("VmHWM")
for p in model.parameters():  # touch every weight: mapped tensors become resident
    p.sum()
print(json.dumps({"baseline": baseline, "peak_load": peak_load, "peak_in_use": status("VmHWM"), "seconds": seconds,
                  "model_bytes": sum(p.nbytes for p in model.parameters())}))  # a tied head is listed once
"""


def write_checkpoint(directory, dtype):
    """A gemma-2b-shaped HF checkpoint in `dtype`, written one tensor at a time from
    a reused 64 MB block of N(0, 0.02) values: nothing of model size is ever held."""
    with torch.device("meta"):
        model = gemma.GemmaForCausalLM(gemma.CONFIGS["gemma-2b"]).to(dtype)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(weights.hf_config(model), indent=2))
    tensors = model.state_dict()  # meta tensors: names, shapes, dtype
    header, offset = {}, 0
    for name, t in tensors.items():  # the layout the safetensors library writes
        header[name] = {"dtype": {torch.bfloat16: "BF16", torch.float32: "F32"}[dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    block = (torch.randn((64 << 20) // dtype.itemsize) * 0.02).to(dtype).view(torch.uint8).numpy()
    with open(directory / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors.values():
            left = t.nbytes
            while left:
                f.write(block[: min(left, len(block))])
                left -= min(left, len(block))
    return (directory / "model.safetensors").stat().st_size


def measure(loader, path, dtype):
    """The report of one load, in a fresh child process."""
    with open(path / "model.safetensors", "rb", buffering=0) as f:  # into the page cache
        buffer = bytearray(64 << 20)
        while f.readinto(buffer):
            pass
    child = subprocess.run([sys.executable, "-c", CHILD, loader, str(path), dtype],
                           cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(child.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-float32", action="store_true", help="skip the 10 GB float32 file")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if sys.platform != "linux":
        sys.exit("reads /proc/self/status: Linux only")

    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:  # deleted whatever happens
        for stored in ["bfloat16"] + ([] if args.no_float32 else ["float32"]):
            path = Path(tmp) / stored
            start = time.perf_counter()
            file_bytes = write_checkpoint(path, getattr(torch, stored))
            print(f"wrote {file_bytes / 1e9:.2f} GB of {stored} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            for loader in ["weights.load", "transformers"]:
                r = measure(loader, path, "bfloat16")
                rows.append({"loader": loader, "file": stored, "loaded_as": "bfloat16", "file_bytes": file_bytes, **r})
                print(f"  {loader}: {r['peak_in_use'] / 1e9:.2f} GB peak", file=sys.stderr)
            (path / "model.safetensors").unlink()  # free the disk before the next file

    gb = lambda n: f"{n / 1e9:.2f}"  # noqa: E731
    print("| loader | file | loaded as | file GB | model GB | baseline GB | peak after load GB | peak in use GB | "
          "peak / file | (peak - baseline) / model | load s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loader']} | {r['file']} | {r['loaded_as']} | {gb(r['file_bytes'])} | {gb(r['model_bytes'])} | "
              f"{gb(r['baseline'])} | {gb(r['peak_load'])} | {gb(r['peak_in_use'])} | "
              f"{r['peak_in_use'] / r['file_bytes']:.2f} | {(r['peak_in_use'] - r['baseline']) / r['model_bytes']:.2f} | "
              f"{r['seconds']:.1f} |")
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
