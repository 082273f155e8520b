"""The shared progress bar: a redrawn line with rate and ETA on a terminal, one line per 10 % in logs,
nothing when disabled, and importable without heavy dependencies."""

import io
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from bevtrain import progress as progress_mod
from bevtrain.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    """A fake clock for bevtrain.progress: set `clock.now` (seconds)."""
    fake = types.SimpleNamespace(now=100.0)
    fake_time = types.SimpleNamespace(
        perf_counter=lambda: fake.now, strftime=time.strftime, gmtime=time.gmtime
    )
    monkeypatch.setattr(progress_mod, "time", fake_time)
    return fake


def test_log_gets_one_line_per_tenth(clock):
    out = io.StringIO()
    bar = Progress(100, True, label="job", unit="things", stream=out)
    for done in range(1, 101):
        clock.now += 0.01
        bar.update(done)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    shown = [int(line.split("| ")[1].split("/")[0]) for line in lines]
    # The first update (decile 0), then the first update in each further tenth; close adds nothing.
    assert shown == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert all(line.startswith("[job] |") and "things/s" in line and "ETA" in line for line in lines)
    assert "100/100 100.0%" in lines[-1]


def test_log_close_writes_the_final_count_when_no_line_showed_it(clock):
    out = io.StringIO()
    bar = Progress(10, True, stream=out)
    bar.update(3)
    bar.update(4)  # still the third tenth: no line
    bar.close()
    shown = [int(line.split("| ")[1].split("/")[0]) for line in out.getvalue().splitlines()]
    assert shown == [3, 4]


def test_terminal_redraws_in_place_with_rate_and_eta(clock):
    out = _Terminal()
    bar = Progress(10, True, label="eval", unit="samples", stream=out)
    clock.now += 2.0
    bar.update(4)  # 2 samples/s, 6 left: 3 s
    first = out.getvalue()
    assert first.startswith("\r[eval] |############------------------| 4/10  40.0%")
    assert "2.00 samples/s" in first and "elapsed 00:02" in first and "ETA 00:03" in first
    clock.now += 0.1
    bar.advance(1)  # within the redraw interval: nothing drawn
    assert out.getvalue() == first
    clock.now += 1.0
    bar.advance(1)
    assert out.getvalue().count("\r") == 2 and "6/10" in out.getvalue()
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1


def test_disabled_writes_nothing(clock):
    out = _Terminal()
    bar = Progress(5, False, stream=out)
    for done in range(6):
        bar.update(done)
    bar.close()
    assert out.getvalue() == "" and bar.done == 5


def test_importable_without_heavy_modules():
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, bevtrain.progress; "
        "heavy = {'torch', 'numpy', 'cv2', 'nuscenes'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)
