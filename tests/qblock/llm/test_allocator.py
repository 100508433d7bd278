"""The allocator tuning: on by default on glibc, off with QBLOCK_MALLOC_TUNE=0, and it stops re-faulting big buffers."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

# logits-sized buffers (4 x 128 x 60000 fp32 = 123 MB) allocated and freed pass after pass, as a forward does
SCRIPT = textwrap.dedent("""
    import resource, torch
    from qblock.llm.allocator import keep_freed_memory
    tuned = keep_freed_memory()
    x = torch.randn(4 * 128, 60000, generator=torch.Generator().manual_seed(0))
    torch.log_softmax(x, dim=-1).sum()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    total = sum(float(torch.log_softmax(x, dim=-1)[:, 0].sum()) for _ in range(5))
    print(tuned, keep_freed_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0, repr(total))
""")


def _run(env_value):
    from conftest import ROOT

    env = dict(os.environ, QBLOCK_MALLOC_TUNE=env_value, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT)
    tuned, again, faults, total = out.stdout.split()
    return tuned == "True", again == "True", int(faults), float(total)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_big_buffers_and_keeps_the_values():
    tuned, again, faults, total = _run("1")
    if not tuned:
        pytest.skip("malloc is not tunable here (not glibc, or the environment tunes or replaces it)")
    off, off_again, faults_off, total_off = _run("0")
    assert again and not off and not off_again
    assert total == total_off  # the same arithmetic; only where the memory comes from differs
    assert faults < faults_off / 2, (faults, faults_off)  # untuned: every pass maps and faults its buffer again
