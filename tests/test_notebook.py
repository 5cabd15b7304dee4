"""notebooks/colab.ipynb runs end to end in its local mode: search, interrupted and resumed, then final."""

import pytest

from tests.search_helpers import ROOT


@pytest.mark.slow
def test_the_colab_notebook_runs_locally_and_survives_an_interruption(subset_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    work = tmp_path / "colab-work"
    monkeypatch.setenv("MMSA_NOTEBOOK_LOCAL", "1")
    monkeypatch.setenv("MMSA_WORKDIR", str(work))
    monkeypatch.setenv("MMSA_DATA", str(subset_dir))
    nb = nbformat.read(ROOT / "notebooks" / "colab.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert ">>> interrupting the search" in text and "exit status 130" in text
    assert "resuming search" in text and "search interrupted" in text
    predictions = (work / "predictions.txt").read_text().split()
    tests = [ln.split(",")[0] for ln in (subset_dir / "test_without_label.txt").read_text().split()[1:]]
    assert predictions[0] == "guid,tag" and [ln.split(",")[0] for ln in predictions[1:]] == tests
    assert (work / "mlruns" / "mlflow.db").exists() and (work / "ray_results").is_dir()
    assert any((work / "feature-cache").iterdir())  # the cache lives in the work folder too
