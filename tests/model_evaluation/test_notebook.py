"""notebooks/model_report.ipynb executes top to bottom on a small subset and stays output-free."""

from __future__ import annotations

import pytest

from tests.conftest import need_shared
from tests.paths import KERMANY, REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = REPO / "notebooks" / "model_report.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None


def _texts(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif "data" in out:
                parts.extend(str(v) for k, v in out["data"].items() if k.startswith("text/"))
    return "\n".join(parts)


@pytest.mark.slow
def test_notebook_executes_on_a_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("model.inference")
    from model.inference import WeightsError, default_weights_path

    try:
        default_weights_path()
    except WeightsError:
        pytest.skip("no shipped weights yet")
    need_shared(KERMANY / "test")
    monkeypatch.setenv("PNEUMO_NOTEBOOK_SUBSET", "24")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    text = _texts(nb)
    images = sum(
        "image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])
    )
    assert "subset 24" in text
    assert "kermany/test: 24 images" in text
    assert "roc_auc" in text and "95% CI" in text
    assert "false positives" in text and "false negatives" in text
    # the guard table comes from model.guard_check, as the card's count does
    assert "dicom/other decodable non-chest flagged:" in text
    # class balance, sizes, examples, curves, 6 evaluation plots, galleries
    assert images >= 10, images
