"""Ext lane: how mmkernels._C was linked.

A compiler whose default search path holds only libstdc++.a (the wrapper g++ of the lent GPU machines) embedded a
second libstdc++ in the extension; its exported std:: symbols mixed with the process's copy and the first error
message that formatted an integer crashed the interpreter (SIGSEGV). setup.py links the shared libstdc++.
"""

import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ext


def _ext_path() -> str:
    from mmkernels._backend import load_ext

    mod = load_ext()
    if mod is None:
        pytest.skip("mmkernels._C is not built")
    return mod.__file__


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs Linux and nm")
def test_extension_does_not_embed_libstdcxx():
    out = subprocess.run(["nm", "-D", "--defined-only", _ext_path()], capture_output=True, text=True, check=True).stdout
    embedded = [line.split()[-1] for line in out.splitlines() if "_ZNSt6locale" in line]
    assert not embedded, (
        f"mmkernels._C defines {len(embedded)} std::locale symbols (a static libstdc++), e.g. {embedded[:3]}"
    )


def test_error_message_with_integers_is_raised_not_crashing():
    # the crash above happened while formatting a shape into a TORCH_CHECK message: run it in a child process
    code = (
        "import torch, mmkernels._C as C\n"
        "try:\n    C.philox_normals(0, 0, -1, torch.device('cpu'))\n"
        "except RuntimeError as e:\n    print('raised:', e)\n"
    )
    _ext_path()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"child exited with {proc.returncode}: {proc.stderr[-500:]}"
    assert "n must be >= 0, got -1" in proc.stdout
