"""launch/colab.ipynb runs top to bottom in a Jupyter kernel, in its `ci` size.

The notebook's parameters cell is followed by an injected one (as papermill
does) setting SIZE = "ci" and a tmp WORKROOT; the kernel is a separate
process started from this interpreter's own kernelspec, with JAX_PLATFORMS=cpu,
and it starts the training runs as its own subprocesses (loopback only: the
notebook installs nothing when pixel_vit is importable).
"""

import glob
import json
import os
import pathlib
import sys
import time

import pytest

SKIP = "needs {} to execute launch/colab.ipynb (pip install -e '.[test]')"
nbformat = pytest.importorskip("nbformat", reason=SKIP.format("nbformat"))
nbclient = pytest.importorskip("nbclient", reason=SKIP.format("nbclient"))
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec", reason=SKIP.format("ipykernel"))

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "launch" / "colab.ipynb"
CELL_TIMEOUT = 420  # seconds for any one cell (the longest takes ~1 min in the ci size)
TOTAL_TIMEOUT = 1200  # seconds for the whole notebook (~4 min in the ci size)

pytestmark = [pytest.mark.notebook, pytest.mark.slow]


def tagged(nb, tag):
  cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


def text_of(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def has_png(cell) -> bool:
  return any(
    "image/png" in o.get("data", {})
    for o in cell.get("outputs", [])
    if o.output_type in ("display_data", "execute_result")
  )


def kernel_environment(tmp_path) -> dict:
  """The kernel's environment: this one, CPU JAX, no fake-device settings, and a
  kernelspec for `python3` that runs this interpreter (sys.executable)."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_NUM_CPU_DEVICES", None)  # the runs use one CPU device, as on a laptop
  flags = [
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # ipykernel's debugger warning on stderr
  env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "jupyter_runtime")
  return env


def test_colab_notebook_runs_in_ci_size(tmp_path, monkeypatch):
  prefix = tmp_path / "kernelspec"
  ipykernel_kernelspec.install(user=False, prefix=str(prefix), kernel_name="python3")
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
  from jupyter_client.kernelspec import KernelSpecManager

  spec = KernelSpecManager().get_kernel_spec("python3")
  assert spec.argv[0] == sys.executable, f"kernelspec python3 runs {spec.argv}, not this Python"

  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    assert not cell.get("outputs") and not cell.get("execution_count"), (
      "launch/colab.ipynb is stored with outputs; clear them before committing"
    )
  workroot = tmp_path / "runs"
  parameters = nb.cells.index(tagged(nb, "parameters"))
  injected = nbformat.v4.new_code_cell(f'SIZE = "ci"\nWORKROOT = {str(workroot)!r}')
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(parameters + 1, injected)

  client = nbclient.NotebookClient(
    nb, kernel_name="python3", timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(tmp_path)}}
  )
  start = time.time()
  deadline = start + TOTAL_TIMEOUT
  with client.setup_kernel(env=kernel_environment(tmp_path)):
    for index, cell in enumerate(nb.cells):
      if cell.cell_type != "code":
        continue
      remaining = deadline - time.time()
      assert remaining > 0, f"notebook over {TOTAL_TIMEOUT} s; stopped before cell {index}"
      client.timeout = int(min(CELL_TIMEOUT, remaining)) + 1
      client.execute_cell(cell, index)  # raises CellExecutionError / CellTimeoutError
  elapsed = time.time() - start
  print(f"notebook (ci size) executed in {elapsed:.0f} s")

  for cell in nb.cells:
    if cell.cell_type == "code":
      errors = [o for o in cell.outputs if o.output_type == "error"]
      assert cell.execution_count and not errors, (cell.source[:200], errors)

  runtime = text_of(tagged(nb, "runtime"))
  assert "backend: cpu" in runtime, runtime
  assert "skipping the install" in text_of(tagged(nb, "install"))

  cls, mae, finetune, dit = (workroot / n for n in ("cls", "mae", "mae_finetune", "dit"))
  for workdir, key in (
    (cls, "eval/top1"),
    (mae, "eval/loss"),
    (finetune, "eval/top1"),
    (dit, "eval/loss"),
  ):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any(key in r for r in records), f"{workdir}/metrics.jsonl has no {key}"
  assert glob.glob(str(mae / "pictures" / "reconstructions_*.png"))
  assert glob.glob(str(dit / "pictures" / "samples_*.png"))
  assert "final eval accuracy" in text_of(tagged(nb, "classification"))
  assert has_png(tagged(nb, "mae")), "the MAE reconstructions were not displayed inline"
  assert has_png(tagged(nb, "dit")), "the DiT samples were not displayed inline"
  assert "printed only" in text_of(tagged(nb, "full_configs"))
