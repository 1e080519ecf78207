"""An lm-evaluation-harness model backed by ember: run any of that harness' tasks on ember checkpoints.

    import lm_eval
    from ember.eval.lm_eval_adapter import EmberLM      # importing registers the model name "ember"
    lm = EmberLM(checkpoint="runs/demo/sft/final", batch_size=16)   # or an HF folder, a .gguf, a llama2.c .bin
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], limit=100)
    lm_eval.simple_evaluate(model="ember", model_args="checkpoint=SmolLM2-135M-Instruct.Q4_1.gguf", tasks=[...])

Every request goes through ember's own scoring (`ember.eval.scoring`): the same tokenization of
(context, continuation) pairs, the same batched log-likelihoods, the same rolling windows and generation,
so numbers agree with `ember eval` on the same requests. This module imports `lm_eval` at the top; nothing
else in ember imports this module, so lm_eval stays an optional (dev) dependency.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ember.common.errors import UserError
from ember.eval.scoring import EvalLM, default_device, generate, load_lm


@register_model("ember")
class EmberLM(LM):
    def __init__(self, checkpoint: str = "", tokenizer: str = "", device: str = "", batch_size: int | str = 16,
                 max_length: int = 0, add_bos: bool | str | None = None, run: str = "", dtype: str = "float32",
                 lm: EvalLM | None = None, **_ignored):
        """checkpoint/tokenizer/run/dtype: as `ember eval` (any format; tokenizer empty = the model's own);
        add_bos None or "auto" = the tokenizer's rule, as lm_eval's "hf" model; or lm: an EvalLM already built
        (tests, custom models). Extra keyword arguments lm_eval passes to every model (max_batch_size, ...)
        are ignored."""
        super().__init__()
        if lm is None:
            bs = 16 if str(batch_size).startswith("auto") else int(batch_size)
            if isinstance(add_bos, str):  # model_args text
                choices = {"auto": None, "none": None, "true": True, "false": False}
                if add_bos.lower() not in choices:
                    raise UserError(f"ember model_args add_bos={add_bos!r}: pass add_bos=auto (the tokenizer's rule), "
                                    f"true or false")
                add_bos = choices[add_bos.lower()]
            lm = load_lm(checkpoint, tokenizer, device=device or default_device(), batch_size=bs,
                         max_len=int(max_length), add_bos=add_bos, dtype=dtype, run=run)
        self.lm = lm

    @property
    def max_length(self) -> int:
        return self.lm.max_len

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests[i].args = (context, continuation)."""
        return self.lm.loglikelihood_text([tuple(r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """requests[i].args = (text,): the whole text's log-likelihood, every token predicted once."""
        return [sum(lp for lp, _ in self.lm.rolling_text(r.args[0])) for r in requests]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """requests[i].args = (context, {"until": [...], "max_gen_toks": n, "do_sample": bool, "temperature": t})."""
        out = []
        for r in requests:
            context, kw = r.args
            until = kw.get("until") or ()
            until = (until,) if isinstance(until, str) else tuple(until)
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            out.append(generate(self.lm, context, int(kw.get("max_gen_toks", 256)), until,
                                temperature=temperature, top_p=float(kw.get("top_p", 1.0)))[0])
        return out
