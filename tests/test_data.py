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
