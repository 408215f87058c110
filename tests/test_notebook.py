"""notebooks/walkthrough.ipynb runs top to bottom (so it cannot rot) and is committed without outputs;
the user guide's links resolve and the options it names exist.

The slow test executes it with nbclient in an ipykernel of this interpreter (a `python3` kernelspec for
sys.executable put first on JUPYTER_PATH; ipykernel, nbclient and nbformat come with the dev extra),
writing its run directory under tmp through DIALBOX_RUNS. DIALBOX_NOTEBOOK_OUT=path.ipynb keeps the executed copy.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


def read_notebook():
    try:
        import nbformat
    except ImportError:
        pytest.fail("the notebook tests need nbformat, nbclient and ipykernel (the dev extra): run `make setup`")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def test_committed_notebook_has_no_outputs():
    nb = read_notebook()
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"cells {dirty} of {NOTEBOOK.name} carry outputs: clear them before committing "
                       "(jupyter nbconvert --clear-output --inplace notebooks/walkthrough.ipynb)")
    assert nb.metadata.kernelspec.name == "python3"


def text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/html") or out.data.get("text/plain", ""))
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback))
    return "".join(parts)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_walkthrough_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = read_notebook()
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell

    runs = tmp_path / "runs"
    monkeypatch.setenv("DIALBOX_RUNS", str(runs))  # the kernel inherits this process's environment
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # A `python3` kernelspec for this interpreter, first on JUPYTER_PATH: a user-level python3 kernel
    # (~/.local/share/jupyter) pointing at another Python cannot take its place.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (Dialbox .venv)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb.cells.append(new_code_cell("import sys; print('KERNEL', sys.executable)"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    started = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    finally:
        print(f"walkthrough.ipynb ran in {time.perf_counter() - started:.0f} s")
        if os.environ.get("DIALBOX_NOTEBOOK_OUT"):
            import nbformat

            nbformat.write(nb, os.environ["DIALBOX_NOTEBOOK_OUT"])

    assert f"KERNEL {sys.executable}" in text_of(nb.cells[-1]), "the kernel is not this interpreter"
    run = runs / "walkthrough"
    metrics = json.loads((run / "saes" / "L6.resid_post" / "metrics.json").read_text())
    assert metrics["d_sae"] == 4 * 576 and metrics["l0"] == pytest.approx(16)
    assert (run / "features" / "L6.resid_post" / "features.parquet").exists()
    assert (run / "report" / "index.html").exists()

    everything = "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    assert everything.count("<svg") >= 3  # three features browsed, each with its histogram
    assert "promotes:" in everything and "refused: ds4 steers only at ffn_out or attn_out" in everything

    import gguf

    exports = run / "vectors" / "exports"
    reader = gguf.GGUFReader(str(exports / "terse.gguf"))
    assert [t.name for t in reader.tensors] == [f"direction.{i}" for i in range(1, 30)]
    assert "refused: ds4 runs only DeepSeek-V4-Flash" in everything  # SmolLM2's 30 x 576 is no file ds4 loads
    assert not list(exports.glob("*.ds4.*"))


DOCS = [ROOT / "README.md", ROOT / "notebooks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = ("run", "model", "data", "store", "harvest", "sae", "train", "eval", "wandb", "explainer", "label",
            "report", "browse", "steer", "contrast", "export", "project", "serve")


def test_doc_links_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not re.match(r"[a-z]+://", target) and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to missing files: {broken}"


def test_guide_names_only_real_options():
    """Every `section.option` the guide mentions is in the generated configuration reference."""
    reference = (ROOT / "docs" / "configuration.md").read_text()
    known = set(re.findall(r"^\| `([^`]+)` \|", reference, re.M))
    guide = re.sub(r"```python.*?```", "", (ROOT / "docs" / "guide.md").read_text(), flags=re.S)  # code, not options
    named = {m.group(1) for m in re.finditer(r"(?<![\w./])([a-z_]+(?:\.[a-z_0-9]+)+)(?==|`|\b)", guide)
             if m.group(1).split(".")[0] in SECTIONS and not m.group(1).endswith((".py", ".md", ".yaml", ".json"))}
    unknown = sorted(n for n in named if n not in known and not any(k.startswith(n + ".") for k in known))
    assert named and not unknown, f"docs/guide.md names options that do not exist: {unknown}"
