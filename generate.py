"""Generate text with Gemma, Gemma 2 or Gemma 3 from the command line, streaming tokens.

    python generate.py                                  # the Gemma 2 demo shipped in the repo
    python generate.py --checkpoint checkpoints/gemma-demo --prompt "The for statement"
    python generate.py --checkpoint ~/gemma-2-2b-it --chat "Write a haiku about tensors."
    python generate.py --checkpoint gemma-3-270m-q4_k_m.gguf --temperature 1.0 --top-k 64 --top-p 0.95

--checkpoint takes a Hugging Face directory, an official .ckpt or a .gguf (see weights.py).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import gemma
import gemma2
import gemma3
import weights

DEMO = Path(__file__).resolve().parent / "checkpoints" / "gemma2-demo"
SMALL_MODEL = 100_000_000  # parameters; below this, one CPU thread by default (--threads)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate text with Gemma, Gemma 2 or Gemma 3.")
    parser.add_argument("--checkpoint", default=str(DEMO), help="HF directory, official .ckpt or .gguf (default: the Gemma 2 demo)")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--prompt", default='The "if" statement is used for conditional execution', help="text to continue")
    text.add_argument("--chat", help="a user message, sent in the chat format of the -it models")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, else float32)")
    parser.add_argument("--compile", action="store_true", help="run prefill and decode through torch.compile (slow to start, faster per token)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 for a model under 100M parameters, else one per core)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")

    torch.manual_seed(args.seed)
    try:
        model = weights.load(args.checkpoint, device=args.device, dtype=args.dtype)
        tokenizer = weights.load_tokenizer(args.checkpoint)
    except (weights.CheckpointError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    # A small model's operations take microseconds: a second thread adds only
    # synchronisation, and when another process holds a core, each operation waits
    # for it (demo decode fell from ~470 to 2-20 tokens/s; see the README).
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL
    torch.set_num_threads(args.threads or (1 if small else torch.get_num_threads()))
    families = {gemma.GemmaForCausalLM: gemma, gemma2.Gemma2ForCausalLM: gemma2, gemma3.Gemma3ForCausalLM: gemma3}
    if type(model) not in families:
        sys.exit(f"error: {args.checkpoint} holds a {type(model).__name__}, which does not generate text")
    family = families[type(model)]

    if args.chat is not None:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.chat}])
        stop = {tokenizer.eos_id, tokenizer.end_of_turn_id}  # -it models end a turn with <end_of_turn>
    else:
        prompt = tokenizer.encode(args.prompt)
        stop = {tokenizer.eos_id}
        print(args.prompt, end="", flush=True)

    new, shown = [], ""
    start = first = time.perf_counter()
    try:
        steps = family.stream(model, [prompt], args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.compile)
        for step in steps:
            if not new:
                first = time.perf_counter()  # the prefill and the first token
            new.append(step.item())
            if new[-1] in stop:
                break
            # Decode everything so far and print what is new: one character can take
            # several byte-fallback tokens, and pieces merge with their neighbours.
            text = tokenizer.decode(new)
            print(text[len(shown):], end="", flush=True)
            shown = text
    except ValueError as e:
        sys.exit(f"\nerror: {e}")
    end = time.perf_counter()
    print()
    if new:
        # Decode speed counts the steps after the first new token, which came with the prefill.
        decode = f" at {(len(new) - 1) / (end - first):.1f} tok/s" if len(new) > 1 else ""
        print(f"[prefill: {len(prompt)} tokens at {len(prompt) / (first - start):.1f} tok/s; "
              f"decode: {len(new)} tokens{decode}]", file=sys.stderr)


if __name__ == "__main__":
    main()
