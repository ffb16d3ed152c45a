"""The corpus step's fetching (benchmarks/quality/corpus.py): a pinned Debian version that apt does not know
stops the step with what to do, not with a subprocess traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import corpus  # noqa: E402


def test_an_unknown_pinned_version_says_to_update_apt_and_keeps_nothing_half_made(tmp_path, monkeypatch):
    calls = []

    def apt_without_the_version(cmd, **kwargs):  # apt-get's answer to a version its lists predate: exit 100
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 100)

    monkeypatch.setattr(corpus.subprocess, "run", apt_without_the_version)
    source = {"name": "python3.11-doc", "where": "debian", "spec": "python3.11-doc=3.11.2-6+deb12u9"}
    with pytest.raises(SystemExit) as stop:
        corpus.fetch(source, tmp_path)
    assert calls == [["apt-get", "download", "-q", source["spec"]]]
    message = str(stop.value)
    assert "apt-get update" in message and "apt-cache policy python3.11-doc" in message and "3.11.2-6+deb12u9" in message
    assert not (tmp_path / "python3.11-doc").exists()  # the next run fetches it again
