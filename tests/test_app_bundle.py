"""Flower ships tba-fed to the ServerApp and the ClientApps as a FAB, which holds only some file types (.py,
.toml, .md, .yaml, .json, ...): every file of the apps' packages must be in it, or the server fails where it reads
one (report.html's .j2 templates were left out, and every federated run ended in the ServerApp)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tba_fed.deploy.processes import app_directory

pytestmark = pytest.mark.slow  # runs the flwr CLI


def test_every_file_of_the_apps_packages_is_in_the_flower_app_bundle(tmp_path):
    repo = app_directory()
    subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(repo)], cwd=tmp_path, check=True,
                   capture_output=True, timeout=300)
    [fab] = tmp_path.glob("*.fab")
    bundled = set(zipfile.ZipFile(fab).namelist())
    tracked = subprocess.run(["git", "ls-files", "tba_fed", "clients", "server"], cwd=repo, check=True,
                             capture_output=True, text=True).stdout.split()
    assert [path for path in tracked if path not in bundled] == []
