"""The comparison's tables: references next to the conditions, seed spread, layout intervals, (a)/(b)
from some seeds only, and re-rendering from the JSON it writes; its layout-level bootstrap intervals
(plain functions, no sampling)."""

import numpy as np
import pytest

from comfyui_eligen.lab import compare
from comfyui_eligen.toyworld import files, metric


def results(ious):
    per_image = [[{"iou": iou, "leak": 0.0, "success": iou > 0.5, "missing": False} for iou in layout] for layout in ious]
    return {"summary": metric.summarise([r for layout in per_image for r in layout]), "images": per_image}


def test_tables_put_the_bound_next_to_the_conditions_and_re_render_from_json(tmp_path):
    references = {"easy": {"fill": results([[0.6, 0.6], [0.6]]), "truth": results([[0.8, 0.8], [0.8]])}}
    runs = [{"seed": 0, "groups": {"easy": {"a": results([[0.1, 0.0], [0.2]]), "b": results([[0.1, 0.1], [0.1]]),
                                            "d": results([[0.6, 0.3], [0.6]])}}},
            {"seed": 1, "groups": {"easy": {"d": results([[0.6, 0.6], [0.3]])}}}]
    table = compare.aggregate(runs, references)["easy"]
    assert table["d"]["mean_iou"]["mean"] == pytest.approx(0.5) and table["d"]["seeds"] == [0, 1]
    assert table["d"]["mean_iou"]["std"] == pytest.approx(0.0)  # both seeds average 0.5
    assert table["d"]["share_of_fill_iou"] == pytest.approx(0.5 / 0.6)
    assert table["a"]["seeds"] == [0] and table["a"]["mean_iou"]["mean"] == pytest.approx(0.1)
    low, high = table["d"]["interval"]["mean_iou"]
    assert low < 0.5 < high  # layouts differ, so the interval has width
    assert table["fill"]["interval"]["mean_iou"] == [pytest.approx(0.6), pytest.approx(0.6)]

    text = compare.summary_table({"easy": table}, {"easy": (2, 3)})
    assert "| easy | 2 (3) | 0.60 / 100% | 0.80 / 100% | 0.10 / 0% | 0.10 / 0% | 0.50 / 67%" in text
    assert text.rstrip().endswith("| 83% |")

    path = str(tmp_path / "compare.json")
    files.write_json(path, {"groups": ["easy"], "layouts": 2, "entities": {"easy": 3}, "runs": runs,
                            "references": references})
    rendered = compare.report(path, str(tmp_path / "table.md"))
    assert rendered["easy"]["d"]["interval"] == table["d"]["interval"]
    assert (tmp_path / "table.md").read_text().startswith("| group |")


def entity(iou):
    return {"iou": iou, "leak": 0.0, "success": iou > 0.5, "missing": False}


def test_bootstrap_intervals_are_seeded_and_cover_the_layouts():
    run = [[entity(0.9), entity(0.7)], [entity(0.1)], [entity(0.6)], [entity(0.3), entity(0.2)]]
    first = compare.bootstrap_intervals([run], samples=500, seed=3)
    assert first == compare.bootstrap_intervals([run], samples=500, seed=3)
    mean = np.mean([r["iou"] for layout in run for r in layout])
    low, high = first["mean_iou"]
    assert 0.1 <= low < mean < high <= 0.9
    # identical layouts: no spread; more layouts of the same kind: a narrower interval
    same = compare.bootstrap_intervals([[[entity(0.4)]] * 8], samples=200)
    assert same["mean_iou"] == [pytest.approx(0.4), pytest.approx(0.4)] and same["success_rate"] == [0.0, 0.0]
    wide = compare.bootstrap_intervals([run], samples=2000)["mean_iou"]
    narrow = compare.bootstrap_intervals([run * 16], samples=2000)["mean_iou"]
    assert narrow[1] - narrow[0] < 0.5 * (wide[1] - wide[0])
    # two seeds pool their entities per layout
    pooled = compare.bootstrap_intervals([[[entity(1.0)]], [[entity(0.0)]]], samples=50)
    assert pooled["mean_iou"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="different numbers of layouts"):
        compare.bootstrap_intervals([run, run[:2]])
