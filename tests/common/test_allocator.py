"""`import ember` makes glibc reuse freed memory for large tensors (ember/__init__.py), measured by page faults."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

# Six steps of a small model's output head and loss (2048 tokens x 8192 vocab: 64 MiB logits, log-probs and
# gradients); report whether ember tuned malloc and the minor page faults of each step. A fresh mmap costs one
# fault per 4 KiB page, ~66k per step here; reused heap pages cost none.
PROBE = """
import json, resource, ember, torch, torch.nn.functional as F
x, w = torch.randn(2048, 256, requires_grad=True), torch.randn(8192, 256, requires_grad=True)
t = torch.randint(0, 8192, (2048,))
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    F.cross_entropy(F.linear(x, w), t).backward()
    x.grad = w.grad = None
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": ember.KEEPS_FREED_MEMORY, "faults": faults}))
"""


def probe(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "EMBER_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_large_tensors_reuse_memory_unless_the_user_opts_out():
    tuned = probe()
    if not tuned["tuned"]:
        pytest.skip("libc here has no glibc mallopt")
    default = probe(EMBER_MALLOC="default")
    assert default["tuned"] is False
    steady_default, steady_tuned = sum(default["faults"][2:]), sum(tuned["faults"][2:])
    assert steady_default > 4 * 3 * 16384, default  # glibc's default: each step faults its big tensors in again
    assert steady_tuned < 0.6 * steady_default, (tuned, default)  # measured: 0.0-0.4x
    assert probe(MALLOC_TRIM_THRESHOLD_="131072")["tuned"] is False  # the user's own glibc settings win
    assert probe(EMBER_MALLOC="off")["tuned"] is False
