"""Shared rollout helpers: masks line up with response tokens, KV-cache sampling equals full-forward decoding."""

import torch
import torch.nn.functional as F

from ember.align import rollout as R
from ember.common.checkpoint import load_model


def test_collate_masks_exactly_the_response_targets():
    b = R.collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert b.ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    targets = b.ids[:, 1:]
    assert targets[b.mask.bool()].tolist() == [5, 6, 7, 8, 9]
    assert b.lens.tolist() == [5, 4] and b.prompt_lens.tolist() == [3, 1]


def test_token_logps_matches_log_softmax(base_run):
    run, tok = base_run
    model = load_model(run / "sft" / "final").eval()
    b = R.collate([[tok.bos_id, 20, 21], [tok.bos_id]], [[30, 31], [40, 41, 42]], tok.pad_id)
    with torch.no_grad():
        for temperature in (1.0, 0.7):  # the distribution replies were sampled from: softmax(logits / T)
            got = R.token_logps(model, b, temperature=temperature)
            logits = model(b.ids[:, :-1]).float() / temperature
            logp = F.log_softmax(logits, -1).gather(-1, b.ids[:, 1:, None])[..., 0]
            assert torch.allclose(got, logp * b.mask, atol=1e-5)


def test_cached_greedy_generation_equals_full_forward_decoding(base_run):
    run, tok = base_run
    model = load_model(run / "sft" / "final").eval()
    prompts = [R.encode_prompt(tok, "What is 3 + 4?", "chat"), R.encode_prompt(tok, "What is 12 + 5?", "chat"),
               R.encode_prompt(tok, "Continue this Python code:\nimport os", "chat")]
    got = R.generate(model, prompts, max_new_tokens=6, stop=tok.end_id, temperature=0.0, batch_size=2)
    for p, g in zip(prompts, got):
        ids = list(p)
        want = []
        with torch.no_grad():
            for _ in range(6):
                nxt = model(torch.tensor([ids]))[0, -1].argmax().item()
                want.append(nxt)
                ids.append(nxt)
                if nxt == tok.end_id:
                    break
        assert g == want


def test_sampling_is_reproducible_with_a_generator(base_run):
    run, tok = base_run
    model = load_model(run / "sft" / "final").eval()
    prompts = [R.encode_prompt(tok, "What is 3 + 4?", "chat")] * 4
    a = R.generate(model, prompts, 5, tok.end_id, 1.0, generator=torch.Generator().manual_seed(1))
    b = R.generate(model, prompts, 5, tok.end_id, 1.0, generator=torch.Generator().manual_seed(1))
    assert a == b


def test_truncate_keeps_prompt_end_and_fits():
    p, r = R.truncate(list(range(10)), list(range(100, 120)), max_len=16, max_prompt_len=6)
    # the prompt's end, with its first token (BOS) kept in front; the response fills the rest
    assert p == [0, 5, 6, 7, 8, 9] and r == list(range(100, 110)) and len(p) + len(r) == 16
    assert R.keep_end([0, 1, 2], 5) == [0, 1, 2] and R.keep_end([0, 1, 2], 1) == [2]


def test_pair_lengths_fit_the_models_context(capsys):
    """DPO/reward sequences past max_seq_len would run through RoPE positions the model never trained on."""
    from ember.model.gpt import GPTConfig, build_model

    model = build_model(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, max_seq_len=64))
    assert R.fit_context(model, 48, 32, "dpo") == (48, 32)  # fits: unchanged
    assert R.fit_context(model, 96, 64, "dpo") == (64, 43)  # the prompt keeps its 2/3 share
    assert "[dpo] max_len 96 is over the model's context of 64 tokens" in capsys.readouterr().out


def test_a_reply_ends_at_any_stop_id_of_the_tokenizer():
    """Rollouts stop where chat and serve stop: the template's end-of-turn first, then EOS and the extra ids of
    generation_config (a Qwen/Llama-3 policy that emits EOS has finished its reply)."""
    import types

    tok = types.SimpleNamespace(end_id=2, eos_id=0, stop_ids=(0, 2, 7), path=None,
                                decode=lambda ids: " ".join(map(str, ids)))
    assert R.stop_ids(tok, "chat") == (2, 0, 7) and R.stop_ids(tok, "raw") == (0, 2, 7)
    assert R.encode_response(types.SimpleNamespace(**vars(tok), encode=lambda t: [5, 6]), "x", "chat") == [5, 6, 2]
    assert R.decode_response(tok, [5, 6, 0, 9], "chat") == "5 6"  # cut at EOS, not only at <|end|>
    assert R.decode_response(tok, [5, 7, 2], "chat") == "5"
