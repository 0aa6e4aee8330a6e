"""Two probe runs paired image by image (app.evaluate.probe_compare, ``vald-md evaluate probe-compare``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.evaluate import probe
from app.evaluate.probe_compare import ProbeCompareError, compare_probes, default_method, format_comparison
from tests.tiny_lungs import BoxSegmenter, write_tiny_segmenter


def _run(data: Path, out: Path, fn, limit: int = 3, normals: int = 2) -> dict:
    seg = BoxSegmenter(write_tiny_segmenter(out.parent / f"seg-{out.name}"))
    return probe.run_probe(data / "lesions-rsna", out, segmenter=seg, map_fn=fn, methods=["product"],
                           limit=limit, normals=normals)


def _rows(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, (out / "probe_rows.jsonl").read_text().splitlines())}


def test_compare_pairs_two_real_probe_runs_image_by_image(shared_data: Path, tmp_path: Path) -> None:
    def noise(img: np.ndarray, lungs: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return {"product": np.random.default_rng(seed + 1).random(img.shape, dtype=np.float32)}

    def dense(img: np.ndarray, lungs: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return {"product": img.astype(np.float32)}

    _run(shared_data, tmp_path / "a", noise)
    _run(shared_data, tmp_path / "b", dense, limit=2)
    c = compare_probes(tmp_path / "a", tmp_path / "b")
    assert (c["images"], c["only_in_a"], c["only_in_b"]) == (2, 1, 0)
    assert c["a"]["method"] == c["b"]["method"] == "product"
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    for part in ("lungs", "whole"):
        want = [rb[k][part]["product"]["pixel_auroc"] - ra[k][part]["product"]["pixel_auroc"]
                for k in rb if "product" in rb[k][part]]
        got = c[part]["pixel_auroc"]
        assert got["n"] == len(want) > 0
        assert got["diff"] == pytest.approx(float(np.mean(want)))
        assert got["b"] - got["a"] == pytest.approx(got["diff"])
        assert got["ci"][0] <= got["diff"] <= got["ci"][1]
    # a baseline of the same run can be paired too: the intensity map is what `dense` returns
    same = compare_probes(tmp_path / "b", tmp_path / "b", method_a="intensity", method_b="product")
    assert same["whole"]["pixel_auroc"]["diff"] == pytest.approx(0.0, abs=1e-9)
    text = format_comparison(c)
    assert "| pixel_auroc, lungs |" in text and "image AUROC (RMS) [95% CI], not paired" in text
    # the map as the viewer shows it (zero outside the lungs), over the whole image: the probe's product@lungs
    shown = [rb[k]["whole"]["product@lungs"]["pixel_auroc"] - ra[k]["whole"]["product@lungs"]["pixel_auroc"]
             for k in rb]
    assert c["shown"]["pixel_auroc"]["diff"] == pytest.approx(float(np.mean(shown)))
    assert "| pixel_auroc, whole image as shown |" in text and "whole image, unrestricted" in text
    assert c["warnings"] == [] and "warning" not in text


def _write(folder: Path, rows: list[dict], methods: tuple[str, ...] = ("product",), **summary) -> Path:
    folder.mkdir(parents=True)
    (folder / "probe.json").write_text(json.dumps({"lungs": {m: {} for m in methods}, "settings": {}, **summary}))
    (folder / "probe_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _row(name: str, auroc: float, method: str = "product") -> dict:
    s = {"pixel_auroc": auroc, "pointing_game": 1.0, "iou_area": 0.5}
    return {"image": name, "whole": {method: s}, "lungs": {method: s}}


def test_compare_takes_the_last_product_map_by_default_and_skips_undefined_scores(tmp_path: Path) -> None:
    assert default_method({"lungs": {"random": {}, "product": {}, "product_mean16_pos_s4": {}}}) == \
        "product_mean16_pos_s4"
    assert default_method({"lungs": {"random": {}}}) == "product"
    # the probe's candidate maps come after the product's map in its real key order, and are never the default
    from app.evaluate.probe import _product_maps

    z = np.zeros((2, 2), np.float32)
    keys = [*_product_maps(z, np.zeros((16, 2, 2), np.float32), 16), *_product_maps(
        z, np.zeros((16, 2, 2), np.float32), 16, "_s4")]
    assert "product_pos_mean16_s4" in keys and default_method({"lungs": {key: {} for key in keys}}) == \
        "product_mean16_pos_s4"
    a = _write(tmp_path / "a", [_row("x.png", 0.6), _row("y.png", float("nan"))])
    b = _write(tmp_path / "b", [_row("x.png", 0.7), _row("y.png", 0.9)])
    c = compare_probes(a, b)
    assert c["lungs"]["pixel_auroc"]["n"] == 1  # y.png: A's AUROC undefined (no lesion pixel in its region)
    assert c["lungs"]["pixel_auroc"]["diff"] == pytest.approx(0.1)
    assert c["lungs"]["pointing_game"]["diff"] == 0.0


def test_compare_refuses_runs_it_cannot_pair_with_a_clear_message(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a", [_row("x.png", 0.6)])
    with pytest.raises(ProbeCompareError, match="no method 'product_pos'; it has: product"):
        compare_probes(a, a, method_b="product_pos")
    with pytest.raises(ProbeCompareError, match="share no image"):
        compare_probes(a, _write(tmp_path / "b", [_row("z.png", 0.6)]))
    with pytest.raises(ProbeCompareError, match="nowhere' is not a probe run folder"):
        compare_probes(a, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeCompareError, match=r"probe\.json is missing"):
        compare_probes(a, tmp_path / "empty")
    bad = _write(tmp_path / "bad", [])
    with pytest.raises(ProbeCompareError, match=r"run B .* has no opacity image rows"):
        compare_probes(a, bad)
    (bad / "probe_rows.jsonl").write_text('{"image": "x.png"}\nnot json\n')
    with pytest.raises(ProbeCompareError, match="line 2 is not a probe row"):
        compare_probes(a, bad)
    with pytest.raises(ProbeCompareError, match="is not a probe run folder"):
        compare_probes(a, a / "probe.json")  # a file given as the folder
    (bad / "probe.json").write_text("[]")
    with pytest.raises(ProbeCompareError, match="is not a probe summary"):
        compare_probes(a, bad)
    (bad / "probe.json").unlink()
    (bad / "probe.json").mkdir()
    with pytest.raises(ProbeCompareError, match="cannot be read"):
        compare_probes(a, bad)
    (bad / "probe.json").rmdir()
    (bad / "probe_rows.jsonl").write_bytes(b"\xff\xfe")
    (bad / "probe.json").write_text("{}")
    with pytest.raises(ProbeCompareError, match=r"probe_rows\.jsonl' cannot be read"):
        compare_probes(a, bad)
    odd = _write(tmp_path / "odd", [_row("x.png", "high")])
    with pytest.raises(ProbeCompareError, match="pixel_auroc of product is not a number"):
        compare_probes(a, odd)
    # the command: one line, exit 2, no traceback
    from app import evaluate

    assert evaluate.main(evaluate.parse_args(["probe-compare", str(a), str(tmp_path / "nowhere")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("vald-md evaluate: ") and "Traceback" not in err and err.count("\n") == 1


def test_compare_command_prints_the_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app import evaluate

    a = _write(tmp_path / "a", [_row("x.png", 0.6), _row("y.png", 0.5)])
    b = _write(tmp_path / "b", [_row("x.png", 0.7), _row("y.png", 0.7)])
    out = tmp_path / "deep" / "c.json"
    assert evaluate.main(evaluate.parse_args(["probe-compare", str(a), str(b), "--json", str(out)])) == 0
    assert "| pixel_auroc, lungs | 0.550 | 0.700 | +0.150" in capsys.readouterr().out
    assert json.loads(out.read_text())["lungs"]["pixel_auroc"]["diff"] == pytest.approx(0.15)
    # --json into a folder: one line, exit 2
    assert evaluate.main(evaluate.parse_args(["probe-compare", str(a), str(b), "--json", str(tmp_path)])) == 2
    err = capsys.readouterr().err
    assert err.startswith("vald-md evaluate: ") and err.count("\n") == 1


def test_compare_warns_when_the_runs_are_not_the_same_images_and_pixels_and_writes_no_nan(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app import evaluate

    seg = {"segmenter": {"sha256": "a" * 64}}
    a = _write(tmp_path / "a", [_row("x.png", 0.6)], seed=0, size=256, **seg,
               image_auroc_lungs_rms={"product": [0.8, float("nan"), float("nan")]})
    b = _write(tmp_path / "b", [_row("x.png", 0.7)], seed=1, size=256, segmenter={"sha256": "b" * 64})
    c = compare_probes(a, b)
    assert c["warnings"] == ["seed: A 0, B 1",
                             "lung segmenter: A aaaaaaaa, B bbbbbbbb (the lungs are not the same pixels)"]
    d = c["lungs"]["pixel_auroc"]
    assert d["n"] == 1 and d["diff"] == pytest.approx(0.1) and all(v != v for v in d["ci"])  # no interval of one pair
    out = tmp_path / "c.json"
    assert evaluate.main(evaluate.parse_args(["probe-compare", str(a), str(b), "--json", str(out)])) == 0
    text = capsys.readouterr().out
    assert text.startswith("warning: the runs differ in seed") and "(no interval: n = 1)" in text
    assert "| image AUROC (RMS) [95% CI], not paired | 0.800 | - |" in text
    saved = out.read_text()
    assert "NaN" not in saved and json.loads(saved)["lungs"]["pixel_auroc"]["ci"] == [None, None]
