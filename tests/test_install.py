"""pyproject.toml declares what may be installed, constraints.txt what CI tested: the two must agree."""
import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    lines = project['dependencies'] + [line for extra in project['optional-dependencies'].values() for line in extra]
    return [Requirement(line) for line in lines]


def _tested() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / 'constraints.txt').read_text().splitlines():
        if line.strip() and not line.startswith('#'):
            name, version = line.split('==')
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_declared_dependency_has_a_tested_version_it_admits():
    tested = _tested()
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        assert name in tested, f'{requirement.name} is declared in pyproject.toml but missing from constraints.txt'
        assert requirement.specifier.contains(tested[name]), f'{requirement} does not admit the tested {tested[name]}'


def test_torch_is_a_range_so_a_users_cuda_build_stays():
    torch = next(r for r in _declared() if r.name == 'torch')
    assert torch.specifier.contains('2.14.1+cu128') and torch.specifier.contains('2.14.2')
    assert not torch.specifier.contains('2.15.0') and not torch.specifier.contains('2.13.0')


@pytest.mark.parametrize('name', sorted(_tested()))
def test_this_environment_is_the_tested_one(name):
    try:
        installed = Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f'{name} is not installed here')
    # a local build label (+cu130) is the same release
    assert Version(installed.public) == _tested()[name], f'{name} {installed} here, constraints.txt tested another'
