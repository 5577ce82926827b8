"""Train the small demo checkpoints shipped in checkpoints/ (CPU, minutes, no download).

    python scripts/train_demo.py [--model gemma|gemma2|gemma3|all] [--steps N] [--out checkpoints] [--threads N]

1. A SentencePiece tokenizer with Gemma's settings (BPE, byte fallback, split
   digits, no normalisation, no dummy prefix, whitespace kept, pad 0 / eos 1 /
   bos 2 / unk 3, the chat turn markers as pieces of their own), with a small
   vocabulary.
2. A small Gemma (multi-query, like gemma-2b), a small Gemma 2 (grouped-query,
   sliding window much shorter than the training context, so the window matters)
   and a small Gemma 3 (seven layers: five local, one global, one local; a still
   shorter window; QK-norm; the two RoPE bases and the global layer's position
   scaling of gemma-3-4b), trained with AdamW on the text that ships with Python
   itself: the pydoc topics (`pydoc_data.topics`, the reference text that
   `help("if")` prints). Gemma 3's tokenizer is the same one with Gemma 3's two
   image pieces appended (ids 4096 and 4097, never in the text): tokenizer.py
   recognises a Gemma 3 vocabulary, and so Gemma 3's chat template, by its
   <end_of_image> piece.

Each is written in the Hugging Face layout (config.json, model.safetensors,
tokenizer.model) with weights.save_hf, so `weights.load(...)` reads it back like
any other checkpoint. The tiny models (1.5M parameters) memorise their corpus:
they exist to make tests, notebooks and the command line run end to end in
seconds, and their continuations read like Python's documentation, not like a
real LM. The shipped ones came from `--model gemma --threads 1` and
`--model gemma2 --threads 1` run side by side (about 7 minutes each with two
idle cores, 30-37 under load): final training loss 0.49 and 0.45, loss on the
held-out topics 6.3 (memorised, not general). The Gemma 3 one came from
`--model gemma3 --threads 1`, 28 minutes on the same two cores under load:
final training loss 0.43, held-out 6.45. The tokenizer file is the same
bytes on every run; the weights can differ in the last bits with the thread count.
"""

import argparse
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemma  # noqa: E402
import gemma2  # noqa: E402
import gemma3  # noqa: E402
import weights  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SEED = 0
THREADS = 2  # torch threads; the machine that built the shipped checkpoints had two cores

# Tokenizer
VOCAB_SIZE = 4096
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3  # as in Gemma
# Gemma's own user-defined pieces include the turn markers and runs of newlines.
USER_DEFINED_SYMBOLS = ["<start_of_turn>", "<end_of_turn>"] + ["\n" * k for k in range(1, 9)]

# Model sizes: Gemma 1 multi-query like gemma-2b, Gemma 2 grouped-query like gemma-2-2b.
GEMMA_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=1024,
)
GEMMA2_CONFIG = dict(
    GEMMA_CONFIG,
    num_key_value_heads=2,
    query_pre_attn_scalar=32,  # = head_dim, as in gemma-2-2b and 9b
    sliding_window=48,  # much shorter than CONTEXT, so the local layers differ from the global ones
)
# Gemma 3 like gemma-3-4b (grouped-query, linear position scaling on the global
# layers), with seven layers so that the 5:1 pattern holds one global layer and
# a local one after it, and a narrower MLP to stay at about the same size.
GEMMA3_CONFIG = dict(
    GEMMA2_CONFIG,
    vocab_size=VOCAB_SIZE + 2,  # + <start_of_image>, <end_of_image>
    intermediate_size=256,
    num_hidden_layers=7,  # local x5, global, local
    sliding_window=32,  # shorter than Gemma 2's, as 1024 is shorter than 4096
    rope_theta=1_000_000.0,  # global layers
    rope_local_base_freq=10_000.0,  # local layers
    rope_scaling={"rope_type": "linear", "factor": 8.0},  # global layers, as in gemma-3-4b
)
# Gemma 3's image pieces (google-deepmind/gemma, gemma/gm/text/_tokenizer.py), after the others.
GEMMA3_IMAGE_PIECES = ["<start_of_image>", "<end_of_image>"]

# Training
CONTEXT = 256  # tokens per training sequence, <bos> included
BATCH = 16
STEPS = 800
LEARNING_RATE = 3e-3
WARMUP_STEPS = 60
MIN_LR_FRACTION = 0.1  # cosine decay down to this fraction of LEARNING_RATE
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
INIT_STD = 0.02
VALID_FRACTION = 0.05  # of the topics, held out to report a validation loss
LOG_EVERY = 50
SAMPLE_PROMPT = "The for statement is used to"


def corpus():
    """The pydoc topics, one document per topic, sorted by name for reproducibility."""
    import pydoc_data.topics

    return [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]


def train_tokenizer(docs, path):
    """A Gemma-style SentencePiece model at `path` (Gemma paper, sec. 2)."""
    lines = [line for doc in docs for line in doc.split("\n")]
    model = io.BytesIO()  # not model_prefix, which the file would record: the same bytes every run
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=USER_DEFINED_SYMBOLS,
        character_coverage=0.9995,  # rarer characters fall back to bytes
        num_threads=THREADS,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return Tokenizer(path)


def add_gemma3_pieces(path, out):
    """The tokenizer at `path` with Gemma 3's image pieces appended, written to `out`.

    New ids after the old ones leave every other id as it was, so the token streams
    and what the model learns from them are those of the other demos.
    """
    proto = sp_model.ModelProto()
    proto.ParseFromString(path.read_bytes())
    for piece in GEMMA3_IMAGE_PIECES:
        proto.pieces.add(piece=piece, score=0.0, type=sp_model.ModelProto.SentencePiece.USER_DEFINED)
    out.write_bytes(proto.SerializeToString())
    tokenizer = Tokenizer(out)
    assert tokenizer.is_gemma3 and tokenizer.vocab_size == GEMMA3_CONFIG["vocab_size"]
    return tokenizer


def token_stream(tokenizer, docs):
    """All documents as one LongTensor, each followed by <eos>."""
    return torch.tensor([t for doc in docs for t in tokenizer.encode(doc, bos=False, eos=True)])


def batch(stream, generator):
    """BATCH windows at random offsets, each starting with <bos> as every prompt does."""
    starts = torch.randint(0, len(stream) - CONTEXT, (BATCH,), generator=generator)
    x = torch.stack([stream[s : s + CONTEXT] for s in starts.tolist()])  # (B, T)
    x[:, 0] = BOS_ID  # <bos>: the model never sees a sequence without it
    return x


def init_weights(model):
    """Normal(0, 0.02) for every matrix (the model classes keep nn's defaults), the
    residual-branch outputs scaled down by sqrt(2L) as in GPT-2; norm weights stay
    zero, which is the identity under Gemma's (1 + w)."""
    residual_std = INIT_STD / math.sqrt(2 * model.config.num_hidden_layers)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else INIT_STD
            nn.init.normal_(p, std=std)


def learning_rate(step, steps):
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return LEARNING_RATE * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_on(model, x):
    logits = model(x[:, :-1])  # (B, T-1, V)
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


@torch.no_grad()
def validation_loss(model, stream):
    model.eval()
    n = (len(stream) - 1) // (CONTEXT - 1)
    windows = [torch.cat([torch.tensor([BOS_ID]), stream[i * (CONTEXT - 1) : (i + 1) * (CONTEXT - 1)]]) for i in range(n)]
    loss = sum(loss_on(model, w[None]).item() for w in windows) / n
    model.train()
    return loss


def train(name, model_class, config, train_stream, valid_stream, steps):
    torch.manual_seed(SEED)
    model = model_class(config)
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {n_params / 1e6:.2f}M parameters, {steps} steps of {BATCH} x {CONTEXT} tokens")
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
        betas=BETAS,
    )
    generator = torch.Generator().manual_seed(SEED)
    start, running = time.time(), None
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        loss = loss_on(model, batch(train_stream, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % LOG_EVERY == 0 or step == steps - 1:
            print(f"{name} step {step:5d}  loss {loss.item():.3f}  (smoothed {running:.3f})  {time.time() - start:6.0f}s", flush=True)
    elapsed = time.time() - start
    print(f"{name}: final training loss {running:.3f} (smoothed), validation loss "
          f"{validation_loss(model, valid_stream):.3f}, {elapsed / 60:.1f} min")
    return model.eval()


def sample(model, family, tokenizer):
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    greedy = family.generate(model, prompt, 60)
    torch.manual_seed(SEED)
    warm = family.generate(model, prompt, 60, temperature=0.8, top_k=40)
    print(f"greedy:    {SAMPLE_PROMPT}{tokenizer.decode(greedy)!r}")
    print(f"T=0.8:     {SAMPLE_PROMPT}{tokenizer.decode(warm)!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["gemma", "gemma2", "gemma3", "all"], default="all")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", default="checkpoints", help="writes OUT/gemma-demo, OUT/gemma2-demo, OUT/gemma3-demo")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (1 each: train them side by side)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    docs = corpus()
    # Every 20th topic is held out: spread over the alphabet, not one corner of it.
    every = round(1 / VALID_FRACTION)
    train_docs = [d for i, d in enumerate(docs) if i % every != every // 2]
    valid_docs = [d for i, d in enumerate(docs) if i % every == every // 2]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = Path(tmp) / "tokenizer.model"
        tokenizer = train_tokenizer(docs, tokenizer_path)
        train_stream, valid_stream = token_stream(tokenizer, train_docs), token_stream(tokenizer, valid_docs)
        print(f"tokenizer: {tokenizer.vocab_size} pieces; {len(train_stream)} training tokens, "
              f"{len(valid_stream)} validation tokens")

        gemma3_tokenizer_path = Path(tmp) / "gemma3" / "tokenizer.model"
        gemma3_tokenizer_path.parent.mkdir()
        add_gemma3_pieces(tokenizer_path, gemma3_tokenizer_path)

        runs = {
            "gemma": (gemma, gemma.GemmaForCausalLM, gemma.GemmaConfig(**GEMMA_CONFIG), tokenizer_path),
            "gemma2": (gemma2, gemma2.Gemma2ForCausalLM, gemma2.Gemma2Config(**GEMMA2_CONFIG), tokenizer_path),
            "gemma3": (gemma3, gemma3.Gemma3ForCausalLM, gemma3.Gemma3TextConfig(**GEMMA3_CONFIG), gemma3_tokenizer_path),
        }
        for name, (family, model_class, config, model_tokenizer) in runs.items():
            if args.model not in (name, "all"):
                continue
            model = train(name, model_class, config, train_stream, valid_stream, args.steps)
            out = Path(args.out) / f"{name}-demo"
            weights.save_hf(model, out, tokenizer_model=model_tokenizer)
            print(f"wrote {out}")
            sample(model, family, tokenizer)


if __name__ == "__main__":
    main()
