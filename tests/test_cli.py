"""The command line, generate.py, end to end on the demo checkpoints shipped in the repo."""

import subprocess
import sys
from pathlib import Path

import pytest

import gemma
import gemma2
import gemma3
import weights

ROOT = Path(__file__).resolve().parents[1]
DEMOS = {family: ROOT / "checkpoints" / f"{family}-demo" for family in ("gemma", "gemma2", "gemma3")}


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_with_no_arguments_it_runs_the_gemma2_demo_and_reports_speed():
    out = run("--max-new-tokens", "20")
    assert out.returncode == 0, out.stderr
    assert "gemma2-demo" in out.stderr
    assert out.stdout.startswith('The "if" statement')
    assert "prefill: " in out.stderr and "decode: 20 tokens at" in out.stderr


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_the_printed_text_is_the_greedy_continuation_of_generate(family):
    prompt = "The for statement"
    out = run("--checkpoint", str(DEMOS[family]), "--prompt", prompt, "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    model, tok = weights.load(DEMOS[family], device="cpu", progress=False), weights.load_tokenizer(DEMOS[family])
    module = {"gemma": gemma, "gemma2": gemma2, "gemma3": gemma3}[family]
    new = module.generate(model, tok.encode(prompt), 12, stop_tokens={tok.eos_id})
    if new[-1] == tok.eos_id:
        new = new[:-1]  # the command line stops at <eos> without printing it
    assert out.stdout == prompt + tok.decode(new) + "\n"


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])  # Gemma 3 writes its own chat template
def test_chat_mode_runs_and_prints_only_the_reply(family):
    out = run("--checkpoint", str(DEMOS[family]), "--chat", "What does the with statement do", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert "<start_of_turn>" not in out.stdout and "What does" not in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "no/such/dir"], "no/such/dir"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "1.5"], "top_p"),
        (["--max-new-tokens", "100000"], "positions"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_input_is_one_line_of_error_not_a_traceback(args, message):
    out = run(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "error:" in out.stderr and message in out.stderr


def test_threads_option_sets_the_cpu_threads_and_a_small_model_gets_one_by_default(capsys):
    import generate
    import torch

    before = torch.get_num_threads()
    try:
        generate.main(["--max-new-tokens", "2", "--threads", "2"])
        assert torch.get_num_threads() == 2
        generate.main(["--max-new-tokens", "2"])  # the 1.5M-parameter demo
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "decode: 2 tokens" in capsys.readouterr().err
