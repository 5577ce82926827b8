"""The implementations bench.py times, each loaded in a child process of its own.

  ours          gemma.stream / gemma2.stream, eager: the readable path;
  ours-compile  the same with compile=True (torch.compile; CUDA graphs on CUDA);
  hf-eager      transformers AutoModelForCausalLM, attn_implementation="eager",
                model.generate(do_sample=False, max_new_tokens=N,
                min_new_tokens=N) with its default DynamicCache, timed per
                token by a streamer;
  hf-sdpa       the same with "sdpa" (not for Gemma 2: transformers runs
                Gemma 2 eagerly because of the attention soft-capping, HF PR #32865).

Both sides bring every token to the host as it is made (ours: .item();
transformers: its streamer receives each token on the CPU), and CUDA is
synchronised before every clock reading.
"""

import gc
import importlib
import statistics
import time

import torch
import torch.nn.functional as F

from harness import DTYPES, prompt_ids, proc_status_bytes, reset_peak_rss, sync, time_it

IMPLS = ["ours", "ours-compile", "hf-eager", "hf-sdpa"]
NO_SDPA = {"gemma2"}  # model_types that transformers runs eagerly


def impls_for(family, impls):
    return [i for i in impls if not (i == "hf-sdpa" and family in NO_SDPA)]


def peak_memory(device):
    """The high-water mark: of the resident set (CPU), of the allocated memory (CUDA)."""
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else proc_status_bytes("VmHWM")


def memory_now(device):
    return torch.cuda.memory_allocated() if device.startswith("cuda") else proc_status_bytes("VmRSS")


def reset_peak(device):
    """Start a new high-water mark from what is in use now; False if the kernel refused."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return True
    return reset_peak_rss()


def ours_runner(model, compile, device):
    family = importlib.import_module(type(model).__module__)  # gemma, gemma2, ...: the module that defines the model

    def run(prompt, n):
        """(start, [time of each new token], peak memory when the first token reached the host) of n new tokens."""
        times, peak = [], None
        sync(device)
        start = time.perf_counter()
        for token in family.stream(model, [prompt], n, compile=compile):
            token.item()  # on the host, as generate() needs it
            times.append(time.perf_counter())
            peak = peak or peak_memory(device)
        return start, times, peak

    return run


def hf_runner(model, device):
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Records when generate hands over the prompt and then each new token."""

        def __init__(self):
            self.times, self.peaks = [], []

        def put(self, value):
            sync(device)
            self.times.append(time.perf_counter())
            if len(self.peaks) < 2:
                self.peaks.append(peak_memory(device))

        def end(self):
            pass

    def run(prompt, n):
        ids = torch.tensor([prompt], device=device)
        clock = Clock()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, streamer=clock)
        return clock.times[0], clock.times[1:], clock.peaks[-1]  # the first put is the prompt

    return run


def load(spec):
    """(model, run, measurements of the load) for spec["impl"] on spec["checkpoint"]."""
    impl, device, path, dtype = spec["impl"], spec["device"], spec["checkpoint"], DTYPES[spec["dtype"]]
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
        auto, attn = transformers.AutoModelForCausalLM, impl.removeprefix("hf-")
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
    result = {"load_s": time.perf_counter() - start, "rss_before_load": rss0, "load_peak_rss": proc_status_bytes("VmHWM"),
              "rss_after_load": proc_status_bytes("VmRSS"), "notes": notes}
    if device.startswith("cuda"):
        result["load_peak_allocated"] = torch.cuda.max_memory_allocated()
    return model, run, result


def weight_matrices(model):
    """Every 2-D parameter once (the tied LM head is the embedding)."""
    seen, out = set(), []
    for p in model.parameters():
        if p.dim() == 2 and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out.append(p)
    return out


@torch.no_grad()
def gemv_pass(matrices):
    """One batch-1 F.linear over each matrix: all that a decode step must stream."""
    inputs = {}
    for w in matrices:
        F.linear(inputs.setdefault(w.shape[1], torch.ones(1, 1, w.shape[1], dtype=w.dtype, device=w.device)), w)


def run_impl(spec):
    """The speed table: prefill tokens/s, decode tokens/s and the GEMV ceiling of one implementation."""
    model, run, result = load(spec)
    device, n, vocab = spec["device"], spec["new_tokens"], spec["vocab_size"]
    # Prefill: time to the first new token; the first run is the warm-up.
    long_prompt = prompt_ids(spec["prompt_len"], vocab, seed=1)
    prefill = []
    for i in range(1 + spec["runs"]):
        t0, times, _ = run(long_prompt, 1)
        if i > 0:
            prefill.append(len(long_prompt) / (times[0] - t0))
    # Decode: the steps after the first new token. Between decode runs, the GEMV
    # ceiling of this very model (the same tensors in the same memory), so that
    # both see the same machine (other jobs, other VMs).
    short_prompt = prompt_ids(spec["decode_prompt_len"], vocab, seed=2)
    matrices = weight_matrices(model)
    gemv_bytes = sum(w.nbytes for w in matrices)
    decode, step_ms, gemv = [], [], []
    for i in range(1 + spec["runs"]):
        t0, times, _ = run(short_prompt, n)
        assert len(times) == n, f"{spec['impl']} made {len(times)} tokens, not {n}"
        if i > 0:
            decode.append((n - 1) / (times[-1] - times[0]))
            step_ms.append(1e3 * statistics.median(b - a for a, b in zip(times, times[1:])))
        gemv.append(gemv_bytes / time_it(lambda: gemv_pass(matrices), device, 3))
    result.update(prefill_tok_s=statistics.median(prefill), prefill_runs=prefill, decode_tok_s=statistics.median(decode),
                  decode_runs=decode, decode_median_step_ms=statistics.median(step_ms), model_gemv_Bps=statistics.median(gemv),
                  model_gemv_runs=gemv, model_weight_bytes=gemv_bytes, peak_rss=proc_status_bytes("VmHWM"))
    if device.startswith("cuda"):
        result["peak_allocated"] = torch.cuda.max_memory_allocated()
    return result


def sweep_impl(spec):
    """The context sweep: for each prompt length, in increasing order, one generation
    of spec["new_tokens"] tokens: prefill seconds (to the first token), its peak
    memory above the resident model, and decode ms/token (between the tokens that follow)."""
    model, run, result = load(spec)
    device, n, vocab = spec["device"], spec["new_tokens"], spec["vocab_size"]
    # The baseline: the loaded model, resident. Both loaders memory-map the
    # safetensors file, and a mapped weight becomes resident only when read.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    gc.collect()
    result["model_resident_bytes"] = memory_now(device)
    run(prompt_ids(64, vocab, seed=0), 4)  # warm-up: one-off allocations and kernel choices
    rows = []
    for length in sorted(spec["lengths"]):
        gc.collect()
        before = memory_now(device)
        # Peak memory of this prefill only: the high-water mark back to what is
        # in use now, read when the first token reaches the host. Without the
        # reset (refused), the peaks of the shorter prompts before would count too.
        reset = reset_peak(device)
        t0, times, peak = run(prompt_ids(length, vocab, seed=length), n)
        assert len(times) == n, f"{spec['impl']} made {len(times)} tokens, not {n}"
        steps = [b - a for a, b in zip(times, times[1:])]
        row = {"length": length, "prefill_s": times[0] - t0, "decode_ms_per_token": 1e3 * (times[-1] - times[0]) / (n - 1),
               "decode_median_step_ms": 1e3 * statistics.median(steps), "memory_before_prefill": before,
               "prefill_peak_memory": peak, "peak_was_reset": reset,
               "prefill_mem_bytes": peak - result["model_resident_bytes"]}
        rows.append(row)
    result["lengths"] = rows
    return result
