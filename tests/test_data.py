"""gradsense.data: DVC-compatible folder hash and verification against data.dvc."""

import subprocess
from pathlib import Path

import pytest
import yaml

from gradsense import GradsenseError
from gradsense.data import dir_md5, verify

ROOT = Path(__file__).resolve().parents[1]


def test_dir_md5_equals_dvc_add(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.csv").write_text("x,y\n1,2\n")
    (tmp_path / "data" / "sub" / "b.bin").write_bytes(bytes(range(256)))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "add", "-q", "data"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]["md5"]
    assert dir_md5(tmp_path / "data") == recorded
    verify(tmp_path)
    (tmp_path / "data" / "a.csv").write_text("x,y\n1,3\n")
    with pytest.raises(GradsenseError, match="data/ does not match data.dvc"):
        verify(tmp_path)


@pytest.mark.integration
def test_committed_data_dvc_matches_the_fetched_data():
    """The fetched data/ (run `make data`) is what data.dvc records."""
    verify(ROOT)


@pytest.mark.integration
def test_fetches_at_once_all_succeed_and_leave_matching_data(tmp_path):
    """`make determinism` fetches data/ from two jobs at once: each must succeed on a half-built data/ (8 racers)."""
    from gradsense.models import DEFAULT_GGUF

    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / "facts").symlink_to(ROOT / "sources" / "facts")
    (tmp_path / "data.dvc").write_bytes((ROOT / "data.dvc").read_bytes())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / DEFAULT_GGUF).hardlink_to(ROOT / "data" / DEFAULT_GGUF)  # no facts/ yet: both must copy
    jobs = [
        subprocess.Popen(["gradsense", "fetch-data", "--root", str(tmp_path)], stderr=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    errors = [job.communicate()[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0] * 8, errors
    verify(tmp_path)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted([DEFAULT_GGUF, "facts"])
    before = (tmp_path / "data" / "facts").stat().st_ino
    subprocess.run(["gradsense", "fetch-data", "--root", str(tmp_path)], check=True, capture_output=True)
    assert (tmp_path / "data" / "facts").stat().st_ino == before  # a matching data/ is not rebuilt under a reader
