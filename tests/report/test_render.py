"""Report rendering from synthetic results: verdicts, tables, figures, self-contained HTML (no browser)."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from pnnh.report.render import Section, aggregate, make_figures, render_html, render_markdown, verdicts, write_report


def _run(family, depth, seed, acc, img_s=300.0, params=853018, status="complete"):
    r = {"family": family, "model": f"{'plain' if family.startswith('plain') else family}{depth}", "depth": depth,
         "seed": seed, "status": status, "params": params, "test_acc": acc, "test_loss": 1.0, "test_images": 2000,
         "train_img_per_s": img_s, "train_seconds": 10.0, "wall_s": 12.0 + depth, "steps": 100, "epochs": 0.21,
         "batch_size": 128, "device": "cpu", "threads": 2, "model_kwargs": {}, "run_dir": f"runs/{family}{depth}-s{seed}",
         "curves": {"train_loss": [[5, 2.3], [50, 1.2 if acc > 0.3 else 2.3], [100, 0.8 if acc > 0.3 else 2.3]],
                    "test_acc": [[100, acc]]}}
    if status != "complete":
        r = {k: (None if k not in ("family", "model", "depth", "seed", "status", "model_kwargs", "run_dir") else v)
             for k, v in r.items()} | {"status": status, "error": "training diverged: ..."}
    return r


def _results(runs, families=("plain", "resnet"), seeds=(0,), data="fashion-mnist", **study):
    return {"study": {"preset": "quick", "description": "test preset.", "data": data, "families": list(families),
                      "family_descriptions": {f: f"the {f} family" for f in families}, "depths": [8, 20, 56],
                      "seeds": list(seeds), "train": {"steps": 100, "batch_size": 128, "optimizer": "sgd", "lr": 0.1,
                                                      "schedule": "onecycle", "test_subset": 2000},
                      "model_kwargs": {}, "runs_planned": len(runs), "runs_finished": len(runs), "complete": True,
                      "skipped": [], "cpu_count": 2, "torch": "2.x", **study},
            "runs": runs}


def _png(w=400, h=300) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# plain degrades with depth, resnet does not (numbers are made up for the test)
STORY = [_run("plain", 8, 0, 0.80, 900), _run("plain", 20, 0, 0.70, 400), _run("plain", 56, 0, 0.134, 362),
         _run("resnet", 8, 0, 0.81, 880), _run("resnet", 20, 0, 0.82, 390), _run("resnet", 56, 0, 0.761, 334)]


def test_verdicts_are_computed_from_the_data():
    v = verdicts(_results(STORY))
    assert ("plain degrades with depth: depth 56 is 66.6 points below depth 8; 80.0% at depth 8 → 70.0% at depth 20 "
            "→ 13.4% at depth 56 (one seed each, so no seed error).") in v
    assert any(s.startswith("resnet dips with depth: depth 56 is 4.9 points below depth 8;") for s in v)
    mild = verdicts(_results([r for r in STORY if r["depth"] < 20] + [_run("plain", 20, 0, 0.75),
                                                                        _run("resnet", 20, 0, 0.82)]))
    assert any(s.startswith("resnet holds up with depth: every depth within 2 points of depth 8 (largest change "
                            "at depth 20: +1.0 points)") for s in mild)
    assert any(s.startswith("plain dips with depth: depth 20 is 5.0 points below depth 8") for s in mild)
    assert "At depth 56, resnet56 is 62.7 points above plain56: 76.1% against 13.4% (one seed each, so no seed " \
           "error)." in v
    assert any(s.startswith("plain56 stayed near chance level (10% for 10 classes)") for s in v)
    assert "At depth 56, plain56 trains at 1.08x the images/s of resnet56." in v
    # flip the story: the verdict follows the numbers, not the family names
    flipped = [dict(r, family={"plain": "resnet", "resnet": "plain"}[r["family"]]) for r in STORY]
    v2 = verdicts(_results(flipped))
    assert any(s.startswith("resnet degrades with depth") for s in v2)
    assert any(s.startswith("plain dips with depth") for s in v2)
    assert any(s.startswith("At depth 56, plain56 is 62.7 points above resnet56") for s in v2)


def _seeded(family, accs_by_depth):
    return [_run(family, d, s, a) for d, accs in accs_by_depth.items() for s, a in enumerate(accs)]


def test_a_difference_within_the_seed_error_is_not_claimed():
    # pnnh56 is 2.5 points above resnet56 on average, but resnet56's seeds spread by 5 points:
    # the Welch standard error of the difference is 2.9 points, so neither is "above" the other
    runs = _seeded("plain", {8: (0.80, 0.81, 0.79), 56: (0.30, 0.35, 0.25)})
    runs += _seeded("resnet", {8: (0.80, 0.81, 0.79), 56: (0.74, 0.84, 0.79)})
    runs += _seeded("pnnh", {8: (0.80, 0.81, 0.79), 56: (0.815, 0.82, 0.81)})
    v = verdicts(_results(runs, families=("plain", "resnet", "pnnh"), seeds=(0, 1, 2)))
    assert ("At depth 56, pnnh56 and resnet56 are within seed error (+2.5 ± 2.9 points): 81.5 ± 0.5% and "
            "79.0 ± 5.0% (3 seeds each).") in v
    assert not any("pnnh56 is" in s and "above resnet56" in s for s in v)
    # a difference beyond twice its error is claimed, with the error
    assert "At depth 56, resnet56 is 49.0 ± 4.1 points above plain56: 79.0 ± 5.0% against 30.0 ± 5.0% " \
           "(3 seeds each)." in v
    assert any(s.startswith("At depth 56, pnnh56 is 51.5 ± 2.9 points above plain56") for s in v)
    # the same means with a tight spread: now the 2.5 points exceed twice the error (0.4)
    tight = [dict(r, test_acc={0: 0.785, 1: 0.79, 2: 0.795}[r["seed"]]) if r["family"] == "resnet" and r["depth"] == 56
             else r for r in runs]
    v2 = verdicts(_results(tight, families=("plain", "resnet", "pnnh"), seeds=(0, 1, 2)))
    assert any(s.startswith("At depth 56, pnnh56 is 2.5 ± 0.4 points above resnet56") for s in v2)


def test_a_dip_at_a_middle_depth_is_not_summarised_as_holding_up():
    # the deepest net is level with the shallowest, but depth 20 is 3.2 points below it (beyond seed error)
    runs = _seeded("plain", {8: (0.80, 0.81, 0.79), 20: (0.76, 0.77, 0.775), 56: (0.795, 0.80, 0.81)})
    runs += _seeded("resnet", {8: (0.80, 0.81, 0.79), 20: (0.70, 0.85, 0.78), 56: (0.74, 0.84, 0.79)})
    v = verdicts(_results(runs, seeds=(0, 1, 2)))
    plain = next(s for s in v if s.startswith("plain "))
    assert plain == ("plain dips with depth: depth 20 is 3.2 ± 0.7 points below depth 8; 80.0 ± 1.0% at depth 8 → "
                     "76.8 ± 0.8% at depth 20 → 80.2 ± 0.8% at depth 56 (3 seeds each).")
    # resnet's 2.3-point dip at depth 20 is within its seed error (± 4.4): said so, with the numbers
    resnet = next(s for s in v if s.startswith("resnet "))
    assert resnet.startswith("resnet holds up with depth: every depth within seed error of depth 8 (largest change "
                             "at depth 20: -2.3 ± 4.4 points);")
    # "within 2 points" only where every depth is: one seed and a 3-point dip in the middle is a dip
    one = [_run("plain", 8, 0, 0.80), _run("plain", 20, 0, 0.769), _run("plain", 56, 0, 0.80)]
    (line,) = [s for s in verdicts(_results(one)) if s.startswith("plain ")]
    assert line.startswith("plain dips with depth: depth 20 is 3.1 points below depth 8;") and "within" not in line


def test_seeds_give_mean_and_std_and_diverged_runs_are_reported():
    runs = [_run("plain", 56, s, a) for s, a in ((0, 0.10), (1, 0.20), (2, 0.30))]
    runs += [_run("resnet", 56, 0, 0.7), _run("resnet", 56, 1, 0.8), _run("resnet", 56, 2, 0.0, status="diverged")]
    res = _results(runs, seeds=(0, 1, 2))
    g = {x.label: x for x in aggregate(res)}
    assert g["plain56"].acc == pytest.approx(0.2) and g["plain56"].acc_std == pytest.approx(0.1)
    assert g["resnet56"].n == 3 and g["resnet56"].n_diverged == 1 and g["resnet56"].acc == pytest.approx(0.75)
    md = render_markdown(res, {})
    assert "| 56 | 20.0 ± 10.0% | 75.0 ± 7.1% (1 of 3 diverged) |" in md
    assert "resnet56: 1 of 3 runs diverged (the loss became NaN or infinite)." in md
    assert "At depth 56, resnet56 is 55.0 ± 7.6 points above plain56: 75.0 ± 7.1% against 20.0 ± 10.0% " \
           "(2 to 3 seeds)." in md
    assert "A difference is claimed only where it exceeds both twice its standard error" in md


def test_markdown_tables_and_figure_links():
    res = _results(STORY, skipped=["family pnnh left out: no registered model pnnh8"])
    figs = make_figures(res)
    assert set(figs) == {"accuracy_vs_depth", "loss_curves", "accuracy_vs_params", "accuracy_vs_wall"}
    md = render_markdown(res, figs)
    assert md.startswith("# Depth study: quick\n")
    assert "| depth | plain | resnet |\n|---|---|---|\n| 8 | 80.0% | 81.0% |\n| 20 | 70.0% | 82.0% |\n" \
           "| 56 | 13.4% | 76.1% |" in md
    assert "| 56 | 362 (1.08x) | 334 |" in md  # throughput with the ratio to resnet
    assert "| plain56 | plain56 | — | 1 | 853k | 13.4% | 362 | 68.0 |" in md
    assert "first 2,000 test images" in md and "- family pnnh left out" in md
    for stem in figs:
        assert f"](plots/{stem}.png)" in md


def test_html_is_self_contained_and_escaped(tmp_path):
    evil = "<b>x</b>&"
    res = _results(STORY + [_run(evil, 8, 0, 0.5)], families=("plain", "resnet", evil))
    section = Section("Diagnostics <test>", ["signal survives & so on"], [("a caption", _png())])
    paths = write_report(tmp_path, res, sections=[section])
    page = paths["html"].read_text()
    assert "<b>x</b>&" not in page and "&lt;b&gt;x&lt;/b&gt;&amp;" in page
    assert "<script" not in page and not re.search(r"(src|href)=\"(https?:|//|file:)", page)
    imgs = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(imgs) == 5 == page.count("<img")
    for b64 in imgs:
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        im.verify()
        assert im.size[0] > 300 and im.size[1] > 200
    assert "<h2>Diagnostics &lt;test&gt;</h2><p>signal survives &amp; so on</p>" in page
    md = paths["md"].read_text()
    assert "## Diagnostics <test>" in md and "](plots/diagnostics_test_0.png)" in md
    assert (tmp_path / "plots" / "diagnostics_test_0.png").is_file()


def test_unfinished_study_says_so():
    res = _results(STORY[:2], complete=False, runs_planned=6, runs_finished=2)
    assert "This study is not finished: 2 of 6 runs are in." in render_markdown(res, {})
    html = render_html(res, {"accuracy_vs_depth": ("cap", _png())})
    assert "This study is not finished" in html and html.count("<img") == 1


def test_a_study_where_everything_diverged_still_renders_without_warnings(tmp_path):
    import warnings

    res = _results([_run("plain", 8, 0, 0.0, status="diverged"), _run("resnet", 8, 0, 0.0, status="diverged")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_report(tmp_path, res)
    md = paths["md"].read_text()
    assert "| 8 | diverged | diverged |" in md and "plain8: 1 of 1 runs diverged" in md
