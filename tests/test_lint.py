"""The tree is clean under the repo's ruff settings (ruff.toml): lint
(pyflakes, pycodestyle, import order) and the formatter. Fix with
`ruff check --fix . && ruff format .`."""

import shutil
import subprocess
import sys

import pytest

from support import REPO_ROOT


def ruff(*args: str) -> subprocess.CompletedProcess:
  executable = shutil.which("ruff")
  command = [executable] if executable else [sys.executable, "-m", "ruff"]
  return subprocess.run(
    [*command, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
  )


@pytest.fixture(scope="module", autouse=True)
def ruff_installed():
  if ruff("--version").returncode != 0:
    pytest.skip("ruff is not installed (it is in the [test] extra)")


def test_ruff_lint_is_clean():
  result = ruff("check", "--output-format=concise", ".")
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ruff_format_leaves_every_file_unchanged():
  result = ruff("format", "--check", ".")
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
