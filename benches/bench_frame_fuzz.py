"""A long fuzz run of the overlay datagram decoder: millions of proptest cases, no panic.

`cargo test` runs the same properties with 20,000 cases; this soak raises it (FRAME_FUZZ_CASES,
default 2,000,000 per property): arbitrary bytes, and valid datagrams with flipped bytes and cuts.
Every case asserts that whatever decodes is well formed (frames of at least an Ethernet header,
nothing after the last), so nothing malformed could reach the TAP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = int(os.environ.get("FRAME_FUZZ_CASES", "2000000"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_frame_decoder_survives_millions_of_cases() -> None:
    if shutil.which("cargo") is None:
        pytest.skip("cargo not on PATH")
    result = subprocess.run(
        ["cargo", "test", "--release", "--quiet", "frame::tests::"],
        cwd=ROOT,
        env={**os.environ, "FRAME_FUZZ_CASES": str(CASES)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "test result: ok" in result.stdout
