"""What importing tba-fed loads, in a fresh interpreter: the engine and the CLI's help stay free of Flower,
Ray, Opacus and the privacy and federation packages (`lint-imports` checks the same rules statically from
pyproject.toml; this checks what actually lands in sys.modules, lazy imports included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import tomli

ROOT = Path(__file__).resolve().parents[1]


def _engine_modules() -> list[str]:
    """The engine, as the import-linter contract in pyproject.toml lists it."""
    contracts = tomli.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return next(c["source_modules"] for c in contracts if c["name"].startswith("The engine"))


def _loaded_after(code: str) -> list[str]:
    """The modules a fresh interpreter holds after running `code` in the repository root."""
    report = "import json, sys; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _under(modules: list[str], *packages: str) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)]


def test_the_package_the_cli_and_the_engine_import_no_flower_ray_opacus_privacy_or_federation():
    engine = _engine_modules()
    assert "tba_fed.calibrate" in engine and "tba_fed.probe" in engine and "tba_fed.checkpoint" in engine
    loaded = _loaded_after("\n".join(["import tba_fed", "import tba_fed.cli", *(f"import {m}" for m in engine)]))
    assert set(engine) <= set(loaded)
    assert _under(loaded, "flwr", "ray", "opacus", "tba_fed.privacy", "tba_fed.federation") == []


def test_the_cli_help_loads_neither_torch_nor_flower():
    """`tba-fed --help` and `tba-fed compress --help` build the parser only (benchmarks/cli_startup.py times them)."""
    for argv in (["--help"], ["compress", "--help"], ["simulate", "--help"]):
        code = f"from tba_fed.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
        assert _under(_loaded_after(code), "torch", "timm", "flwr", "ray", "opacus", "pydantic") == [], argv


def test_the_api_is_loaded_on_first_use_and_calibrate_stays_the_function():
    """`tba_fed.calibrate` was the pipeline function when the package imported it eagerly; importing the submodule
    of the same name first must not change that."""
    code = ("import tba_fed.calibrate, tba_fed.pipeline\nimport tba_fed\n"
            "assert tba_fed.calibrate is tba_fed.pipeline.calibrate, tba_fed.calibrate\n"
            "from tba_fed import calibrate, ModelConfig, simulate\n"
            "assert calibrate is tba_fed.pipeline.calibrate and ModelConfig.__module__ == 'tba_fed.config'\n"
            "assert sorted(tba_fed.__all__) == tba_fed.__all__ and set(tba_fed.__all__) <= set(dir(tba_fed))\n"
            "assert all(getattr(tba_fed, name) is not None for name in tba_fed.__all__)")
    _loaded_after(code)
