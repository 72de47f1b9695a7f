"""examples/serve_many.py runs end to end and its streamed pieces add up to each final output."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_many_streams_every_request_to_completion():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_many.py"), "--prompts", "7",
                          "--max-new-tokens", "6", "--batch", "3", "--temperature", "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.startswith("model: ")
    finals = re.findall(r"^r(\d+) \((eos|length|stop), (\d+) tokens\): ", out, flags=re.M)
    assert sorted(int(r) for r, _, _ in finals) == list(range(7))          # every request finished
    for rid, reason, n in finals:
        assert 0 <= int(n) <= 6 and (reason != "length" or int(n) == 6)
        assert f"[r{rid}] +" in out or int(n) == 0                          # and streamed
    assert re.search(r"^served 7 requests, \d+ tokens in \d+ steps", out, flags=re.M)
    assert "streamed tokens equal every final output" in out
