"""The lm_eval adapter gives the same numbers as ember's own harness on a local task definition (no download)."""

from __future__ import annotations

import json
import textwrap

import pytest

from ember.eval import scoring
from ember.eval.tasks import Options, arc, multiple_choice, perplexity

from .conftest import ASSETS, close

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is a dev extra")


def local_tasks(tmp_path) -> "lm_eval.tasks.TaskManager":
    from lm_eval.tasks import TaskManager

    items = arc.load(ASSETS / "arc_tiny.jsonl")
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"question": it["context"][len("Question: "):-len("\nAnswer:")],
                                                            "choices": it["choices"], "gold": it["gold"]}) + "\n"
                                               for it in items))
    stories = (ASSETS / "heldout_stories.jsonl").read_text()
    (tmp_path / "text.jsonl").write_text(stories)
    common = """
        dataset_path: json
        test_split: test
        metadata:
          version: 1.0
    """
    (tmp_path / "mc.yaml").write_text(textwrap.dedent(f"""
        task: ember_tiny_mc
        dataset_kwargs:
          data_files:
            test: {tmp_path / 'mc.jsonl'}
          cache_dir: {tmp_path / 'hf_cache'}
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_target: "{{{{gold}}}}"
        doc_to_choice: "{{{{choices}}}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
    """) + textwrap.dedent(common))
    (tmp_path / "ppl.yaml").write_text(textwrap.dedent(f"""
        task: ember_tiny_ppl
        dataset_kwargs:
          data_files:
            test: {tmp_path / 'text.jsonl'}
          cache_dir: {tmp_path / 'hf_cache'}
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
    """) + textwrap.dedent(common))
    (tmp_path / "gen.yaml").write_text(textwrap.dedent(f"""
        task: ember_tiny_gen
        dataset_kwargs:
          data_files:
            test: {tmp_path / 'mc.jsonl'}
          cache_dir: {tmp_path / 'hf_cache'}
        output_type: generate_until
        doc_to_text: "Q: {{{{question}}}}\\nA:"
        doc_to_target: "{{{{choices[gold]}}}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 12
          do_sample: false
        metric_list:
          - metric: exact_match
    """) + textwrap.dedent(common))
    return TaskManager(include_path=str(tmp_path), include_defaults=False)  # no scan of its thousands of tasks


@pytest.fixture
def adapter(lm):
    from ember.eval.lm_eval_adapter import EmberLM

    return EmberLM(lm=lm)


def test_adapter_matches_ember_harness_on_local_tasks(tmp_path, monkeypatch, lm, adapter):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = lm_eval.simple_evaluate(model=adapter, tasks=["ember_tiny_mc", "ember_tiny_ppl", "ember_tiny_gen"],
                                  task_manager=local_tasks(tmp_path), log_samples=True, bootstrap_iters=0)
    # multiple choice: every (context, choice) log-likelihood equals ember's, and so does accuracy
    items = arc.load(ASSETS / "arc_tiny.jsonl")
    ours = multiple_choice.run(lm, items, items, 0, Options())
    samples = sorted(out["samples"]["ember_tiny_mc"], key=lambda s: s["doc_id"])
    for it, s in zip(items, samples):
        theirs = [r[0][0] for r in s["resps"]]
        mine = [lp for lp, _ in lm.loglikelihood_text([(it["context"], " " + c) for c in it["choices"]])]
        assert all(close(a, b, 1e-6) for a, b in zip(theirs, mine))
    assert out["results"]["ember_tiny_mc"]["acc,none"] == pytest.approx(ours.cols["acc"].mean())
    assert out["results"]["ember_tiny_mc"]["acc_norm,none"] == pytest.approx(ours.cols["acc_norm"].mean())
    # rolling log-likelihood: lm_eval's bits_per_byte from our numbers equals ember's perplexity task
    ppl_items = perplexity.load(ASSETS / "heldout_stories.jsonl")
    mine = perplexity.run(lm, ppl_items, [], 0, Options())
    assert out["results"]["ember_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(
        mine.stat(mine.cols)["bits_per_byte"], rel=1e-6)
    # generation: the same greedy continuation as ember's generate
    gen = sorted(out["samples"]["ember_tiny_gen"], key=lambda s: s["doc_id"])
    for s in gen:
        prompt = s["arguments"][0][0]
        assert s["resps"][0][0] == scoring.generate(lm, prompt, 12, ("\n",))[0]


def test_rolling_matches_lm_eval_window_rule(bigram, adapter):
    """lm_eval's documented example: max length 4, tokens 0..9 -> every token predicted once."""
    from lm_eval.api.instance import Instance

    text = "0123456789"
    adapter.lm.max_len = 4
    (got,) = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [256] + list(text.encode())
    assert close(got, sum(bigram.logp(ids[i - 1], ids[i]) for i in range(1, len(ids))))
