"""`pnnh ablate`: runs every cell once, reuses finished runs, reports mean ± std and missing runs."""

import json

import pytest

from pnnh.cli import main
from pnnh.errors import ConfigError
from pnnh.report.ablate import (BUDGETS, VARIANTS, Variant, ablation_grid, aggregate, choose_lr, format_report,
                                frontiers, parse_variant, selection_variants, split_variants,
                                write_frontier_figures)
from pnnh.models import create_model
from pnnh.train import TrainConfig

TINY = ["--depths", "8", "--budgets", "short", "--short-steps", "3", "--train-subset", "256",
        "--test-subset", "100"]
# depth 8 = one block per stage; width 0.25 keeps each run to a second or two
VARS = "p=pnnh{d}:width=0.25,r=resnet{d}:width=0.25"


def _register_depth_8(monkeypatch):
    """Depth 8 is not registered; throwaway entry points for one test."""
    import pnnh.models.pnnh_cnn as pc
    import pnnh.models.resnet as rn
    from pnnh.models._registry import _MODELS, ModelInfo

    for name, fn in (("pnnh8", lambda **k: pc.cifar_pnnh(8, **k)), ("resnet8", lambda **k: rn.cifar_resnet(8, **k))):
        monkeypatch.setitem(_MODELS, name, ModelInfo(name, "test", 8, "cifar", fn))


def test_ablate_runs_reuses_and_reports(tmp_path, fmnist_dir, capsys, monkeypatch):
    _register_depth_8(monkeypatch)
    out, report = tmp_path / "abl", tmp_path / "r.md"
    args = ["ablate", "--variants", VARS, "--seeds", "0,1", "--out", str(out), "--report", str(report),
            "--data-dir", str(fmnist_dir), *TINY]
    main(args)
    first = capsys.readouterr().out
    assert first.count("test acc") == 4  # 2 variants x 2 seeds trained
    text = report.read_text()
    assert "pnnh ablate" in text and "## short budget, depth 8" in text
    row = next(l for l in text.splitlines() if l.startswith("| p |"))
    assert "| 2 |" in row and "±" in row
    assert (out / "short" / "d8" / "p" / "s1" / "summary.json").exists()

    html = (out / "report.html").read_text()  # the same tables, with plots embedded, no scripts
    assert "<h3>depth 8</h3>" in html and html.count("data:image/png;base64,") == 3 and "<script" not in html
    marker = json.loads((out / "short" / "d8" / "p" / "s1" / "ablate_config.json").read_text())
    assert marker["model"] == "pnnh8" and marker["steps"] == 3 and "threads" not in marker and "out" not in marker

    summaries = sorted(out.glob("short/d8/*/s*/summary.json"))
    before = {p: p.stat().st_mtime_ns for p in summaries}
    main(args)  # everything finished: nothing trains again
    again = capsys.readouterr().out
    assert again.count("finished earlier, kept") == 4 and "training" not in again
    assert {p: p.stat().st_mtime_ns for p in summaries} == before

    main([*args[:4], "0,1,2", *args[5:], "--dry-run"])  # a third seed, not run: reported as missing
    text = report.read_text()
    assert "not run: seeds [2]" in text


def test_lr_selection_chooses_per_variant_then_trains_the_budgets_at_the_choice(tmp_path, fmnist_dir, capsys,
                                                                                  monkeypatch):
    _register_depth_8(monkeypatch)
    out, report = tmp_path / "abl", tmp_path / "r.md"
    args = ["ablate", "--variants", VARS, "--seeds", "0,1", "--out", str(out), "--report", str(report),
            "--data-dir", str(fmnist_dir), *TINY, "--select-lr", "0.2,0.02", "--select-budget", "short",
            "--select-seeds", "0"]
    main(args)
    log = capsys.readouterr().out
    assert "lr selection: short budget, lr 0.02, 0.2, seeds 0" in log
    for variant in ("p", "r"):
        accs = {lr: json.loads((out / f"short@lr{lr}" / "d8" / variant / "s0" / "summary.json").read_text())["test_acc"]
                for lr in ("0.02", "0.2")}
        best = max(sorted(accs), key=lambda lr: accs[lr])  # the rule: best mean accuracy, ties to the smaller lr
        # the budget's runs train at the chosen lr: seed 0 is the selection's own run, seed 1 is new
        marker = json.loads((out / f"short@lr{best}" / "d8" / variant / "s1" / "ablate_config.json").read_text())
        assert marker["lr"] == float(best)
        other = "0.2" if best == "0.02" else "0.02"
        assert not (out / f"short@lr{other}" / "d8" / variant / "s1").exists()
    assert log.count(": training") == 6  # 2 variants x 2 lrs at seed 0, then seed 1 of each at its lr
    assert log.count("finished earlier, kept") == 2  # seed 0 at the chosen lr is the selection's run
    text = report.read_text()
    assert "## Learning-rate selection (short budget)" in text
    assert "| variant | depth | lr 0.02 | lr 0.2 | chosen lr |" in text
    assert "a peak lr chosen per family" in text and "| variant | model | options | lr | seeds |" in text
    main(args)  # everything is on disk: nothing trains again
    assert "training" not in capsys.readouterr().out


def test_lr_selection_runs_once_per_family_and_every_width_trains_at_its_choice(tmp_path, fmnist_dir, capsys,
                                                                                monkeypatch):
    """A narrower width names its full-width variant as family: only the family trains the lr grid."""
    _register_depth_8(monkeypatch)
    monkeypatch.setitem(VARIANTS, "r", Variant("r", "resnet{d}", {"width": 0.25}))
    monkeypatch.setitem(VARIANTS, "r-half", Variant("r-half", "resnet{d}", {"width": 0.125}, family="r"))
    out = tmp_path / "abl"
    main(["ablate", "--variants", "r-half", "--seeds", "1", "--out", str(out), "--data-dir", str(fmnist_dir), *TINY,
          "--select-lr", "0.2,0.02", "--select-budget", "short", "--select-seeds", "0"])
    log = capsys.readouterr().out
    accs = {lr: json.loads((out / f"short@lr{lr}" / "d8" / "r" / "s0" / "summary.json").read_text())["test_acc"]
            for lr in ("0.02", "0.2")}
    best = max(sorted(accs), key=lambda lr: accs[lr])
    assert not list(out.glob("*/d8/r-half/s0"))  # the width itself trained no selection run
    marker = json.loads((out / f"short@lr{best}" / "d8" / "r-half" / "s1" / "ablate_config.json").read_text())
    assert marker["lr"] == float(best) and marker["model_kwargs"] == {"width": 0.125}
    assert log.count(": training") == 3  # the family at 2 lrs, then the width at the chosen one
    assert [v.label for v in selection_variants([VARIANTS["r-half"], VARIANTS["r"], VARIANTS["pnnh"]])] == ["r", "pnnh"]


def test_catalogue_widths_share_their_familys_design():
    """A catalogue family is the same model and options at full width, so one lr choice fits both."""
    members = [v for v in VARIANTS.values() if v.family]
    assert {v.family for v in members} >= {"resnet", "pnnh", "plain-diracp"}
    for v in members:
        fam = VARIANTS[v.family]
        assert not fam.family and fam.template == v.template, v.label
        assert {k: x for k, x in v.kwargs.items() if k != "width"} == fam.kwargs and "width" in v.kwargs, v.label


def test_choose_lr_rule():
    def rec(lr, seed, acc, status="complete"):
        summary = None if status is None else {"status": status, "test_acc": acc}
        return {"budget": "screen", "depth": 56, "variant": "a", "lr": lr, "seed": seed, "summary": summary}

    chosen, (row,) = choose_lr([rec(0.05, 0, 0.80), rec(0.05, 1, 0.82), rec(0.1, 0, 0.83), rec(0.1, 1, 0.79),
                                rec(0.2, 0, 0.95), rec(0.2, 1, 0, "diverged")])
    assert chosen == {("a", 56): 0.05} and row["diverged"] == [0.2]  # a diverged seed rules its lr out; tie: smaller
    chosen, (row,) = choose_lr([rec(0.05, 0, 0.8), rec(0.1, 0, 0.9), rec(0.1, 1, None, None)])
    assert chosen == {} and row["chosen"] is None and row["missing"] == [0.1]  # a seed still to run: no choice yet


@pytest.mark.parametrize("value,message", [("0.1,x", "comma-separated numbers"), ("0,0.1", "positive")])
def test_bad_lr_grid_is_one_clear_error(tmp_path, capsys, value, message):
    with pytest.raises(SystemExit):
        main(["ablate", "--variants", "resnet", "--depths", "20", "--out", str(tmp_path), "--select-lr", value,
              "--dry-run"])
    err = capsys.readouterr().err
    assert err.startswith("error: --select-lr") and message in err and len(err.splitlines()) == 1


def test_variants_parse_and_config_errors(tmp_path):
    v = parse_variant("x=pnnh{d}:coder_ratio=0.25,coder=shared")
    assert v.model(56) == "pnnh56" and v.kwargs == {"coder_ratio": 0.25, "coder": "shared"}
    assert parse_variant("pnnh") is VARIANTS["pnnh"]
    # in a --variants list a custom variant's own options continue it; a {d} template starts the next
    vs = split_variants("resnet, a=pnnh{d}:coder_ratio=0.125,path_param=init,b=plain{d},pnnh-diracp")
    assert [v.label for v in vs] == ["resnet", "a", "b", "pnnh-diracp"]
    assert vs[1].kwargs == {"coder_ratio": 0.125, "path_param": "init"} and vs[2].kwargs == {}
    with pytest.raises(ConfigError, match="unknown variant"):
        parse_variant("pnhh")
    with pytest.raises(ConfigError, match="\\{d\\}"):
        parse_variant("x=pnnh56")
    with pytest.raises(SystemExit):
        main(["ablate", "--budgets", "forever", "--out", str(tmp_path)])


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_every_budget_is_a_valid_training_config(name):
    """A budget is a set of TrainConfig fields: a misspelt or out-of-range one fails here, not hours into a run."""
    cfg = TrainConfig(model="resnet20", data="fashion-mnist", **BUDGETS[name]).validate()
    assert (cfg.epochs is None) != (cfg.steps is None)


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_every_budget_builds_its_runs_with_the_command_lines_fields(name, tmp_path):
    """The grid merges a budget with the command line's fields as `pnnh ablate` passes them: an unset
    field keeps the budget's value, a set one wins, and no field is given twice."""
    unset = {"data": "fashion-mnist", "data_dir": None, "train_subset": None, "test_subset": None, "threads": 1}
    grid, _ = ablation_grid([VARIANTS["resnet"]], [20], [0], [name], tmp_path, unset)
    assert grid.runs[0].cfg.test_subset == BUDGETS[name].get("test_subset")
    grid, _ = ablation_grid([VARIANTS["resnet"]], [20], [0], [name], tmp_path, {**unset, "test_subset": 50})
    assert grid.runs[0].cfg.test_subset == 50


def test_aggregate_mean_std_and_diverged():
    recs = [{"budget": "short", "depth": 20, "variant": "a", "model": "m", "kwargs": {}, "seed": s,
             "summary": {"status": "complete", "test_acc": acc, "train_img_per_s": 10.0, "wall_s": 1.0, "params": 5}}
            for s, acc in ((0, 0.5), (1, 0.7))]
    recs.append({"budget": "short", "depth": 20, "variant": "a", "model": "m", "kwargs": {}, "seed": 2,
                 "summary": {"status": "diverged"}})
    (row,) = aggregate(recs)
    assert row["accs"] == [50.0, 70.0] and row["diverged"] == [2]
    report = format_report(recs, "cmd")
    assert "60.00 ± 14.14" in report  # sample std of 50 and 70
    one = format_report(recs[:1], "cmd")
    assert "50.00 (1 seed: no spread)" in one and "± 0.00" not in one  # one seed has no spread to show


def test_report_compares_with_the_reference_variant():
    def rec(variant, seed, acc, params, threads=2):
        return {"budget": "long", "depth": 56, "variant": variant, "model": "m", "kwargs": {}, "seed": seed,
                "summary": {"status": "complete", "test_acc": acc, "train_img_per_s": 10.0, "wall_s": 1.0,
                            "params": params, "threads": threads}}

    recs = [rec("a", 0, 0.5, 5), rec("a", 1, 0.7, 5), rec("resnet", 0, 0.80, 10), rec("resnet", 1, 0.82, 10),
            rec("b", 0, 0.9, 20, threads=1)]
    report = format_report(recs, "cmd")
    lines = report.splitlines()
    assert "| variant | model | options | seeds | test acc % | Δ acc vs resnet | params × |" in report
    row = next(l for l in lines if l.startswith("| a |"))
    # 60 - 81 = -21; Welch error sqrt(14.142^2/2 + 1.414^2/2) = sqrt(101) = 10.05
    assert "| -21.00 ± 10.05 | 0.50 |" in row
    assert "| +9.00 ± 1.00 | 2.00 |" in next(l for l in lines if l.startswith("| b |"))  # one seed: no spread of its own
    assert "| — | — |" in next(l for l in lines if l.startswith("| resnet |"))
    assert "1 or 2 threads" in report
    one_each = format_report([rec("a", 0, 0.5, 5), rec("resnet", 0, 0.8, 10)], "cmd")
    assert "| -30.00 (1 seed each: no spread) | 0.50 |" in one_each
    # without a reference (or when the cell has none) the table keeps its plain columns
    plain = format_report(recs, "cmd", reference=None)
    assert "Δ acc" not in plain and "| a | m | — | 2 | 60.00 ± 14.14 | 5 |" in plain
    assert "Δ acc vs" not in format_report([r for r in recs if r["variant"] != "resnet"], "cmd")


def test_speed_measures_the_variants_side_by_side_as_training_runs_them(tmp_path, fmnist_dir, capsys, monkeypatch):
    """`--speed` times the frontier's variants with `pnnh bench`: training's layout, the budget's precision."""
    import pnnh.cli.ablate as cli_ablate

    _register_depth_8(monkeypatch)
    seen = []
    real = cli_ablate.run_bench
    monkeypatch.setattr(cli_ablate, "run_bench", lambda cfg: seen.append((cfg, real(cfg))) or seen[-1][1])
    out, report = tmp_path / "abl", tmp_path / "r.md"
    speed_vs = "r=resnet{d}:width=0.25,p=pnnh{d}:width=0.25,coder=pointwise"
    main(["ablate", "--variants", speed_vs, "--speed", "--speed-variants", speed_vs, "--frontier", "--dry-run",
          "--out", str(out), "--report", str(report), "--data-dir", str(fmnist_dir), *TINY])
    ((cfg, raw),) = seen
    assert cfg.models == ["resnet8:width=0.25", "pnnh8:width=0.25:coder=pointwise"]
    assert cfg.channels_last == TrainConfig.channels_last and cfg.amp is None and cfg.threads == 1
    assert [r["dtype"] for r in raw["rows"]] == ["float32", "float32"]
    text = report.read_text()
    row = next(l for l in text.splitlines() if l.startswith("| pnnh8 | width=0.25, coder=pointwise | fp32 |"))
    assert f"{raw['rows'][1]['params']:,}" in row and f"{raw['rows'][1]['img_per_s']:.0f}" in row

    seen.clear()  # a bf16 budget is timed under bf16 autocast
    rows = cli_ablate.side_by_side_speed([(v, 8) for v in split_variants(speed_vs)], "bf16", repeats=1, steps=1,
                                        batch_size=4)
    ((cfg, raw),) = seen
    assert cfg.amp == "bf16" and [r["dtype"] for r in raw["rows"]] == ["bfloat16", "bfloat16"]
    assert [(r["model"], r["kwargs"], r["amp"]) for r in rows] == [
        ("resnet8", {"width": 0.25}, "bf16"), ("pnnh8", {"width": 0.25, "coder": "pointwise"}, "bf16")]
    assert rows[0]["ratio"] == 1.0 and rows[1]["img_s"] > 0 and rows[1]["params"] < rows[0]["params"]
    assert {r["ratio_to"] for r in rows} == {"resnet8:width=0.25"}
    text = format_report([], "cmd", speed=rows)  # the page states the measurement as it was made
    assert "(1 step each," in text and "a batch of 4," in text and "2 steps" not in text
    assert text.count("| resnet8:width=0.25 |") == 2


def test_frontier_across_depths_compares_every_depth_with_the_reference_depth(tmp_path, fmnist_dir, monkeypatch):
    """Depth and width as two ways to a cheaper net: one frontier, one side-by-side speed measurement."""
    import pnnh.cli.ablate as cli_ablate

    _register_depth_8(monkeypatch)
    seen = []
    real = cli_ablate.run_bench
    monkeypatch.setattr(cli_ablate, "run_bench", lambda cfg: seen.append(cfg) or real(cfg))
    out, report = tmp_path / "abl", tmp_path / "r.md"
    main(["ablate", "--variants", VARS, "--depths", "8,20", *TINY[2:], "--out", str(out), "--report", str(report),
          "--data-dir", str(fmnist_dir), "--frontier", "--frontier-reference-depth", "20", "--reference", "r",
          "--speed", "--speed-variants", "r=resnet{d}:width=0.25,p=pnnh{d}:width=0.25"])
    (cfg,) = seen  # all depths in one measurement, the reference depth first
    assert cfg.models == ["resnet20:width=0.25", "pnnh20:width=0.25", "resnet8:width=0.25", "pnnh8:width=0.25"]
    text = report.read_text()
    assert "--frontier --frontier-reference-depth 20" in text and "--frontier True" not in text
    assert text.count("## Accuracy against cost:") == 1 and "## Accuracy against cost: short budget, depths 8, 20" in text
    lines = text.splitlines()
    head = next(l for l in lines if l.startswith("| design | variant | depth | width |"))
    assert "params × r d20" in head and "Δ acc vs r d20" in head and "speed × r d20" in head
    ref = next(l for l in lines if l.startswith("| r d20 | r | 20 | 0.25 |"))
    small = next(l for l in lines if l.startswith("| p d8 | p | 8 | 0.25 |")).split(" | ")
    params = lambda m: sum(t.numel() for t in create_model(m, num_classes=10, in_chans=1, width=0.25).parameters())
    assert small[5] == f"{params('pnnh8') / params('resnet20'):.3f}" and "| 1.000 |" in ref
    assert (tmp_path / "r_frontier_short_d8-20_params.png").exists()
    assert (tmp_path / "r_frontier_short_d8-20_loss.png").read_bytes()[:4] == b"\x89PNG"  # why a design falls short
    assert head.endswith("| train loss, last epoch |") and float(small[-2]) > 0  # the seeds' final-epoch loss
    speed_rows = [l for l in lines if l.startswith("| pnnh8 |") or l.startswith("| resnet8 |")]
    assert speed_rows and all(l.endswith("| resnet20:width=0.25 |") for l in speed_rows)  # ratios to the reference depth


def test_speed_refuses_options_a_bench_spec_cannot_carry():
    from pnnh.cli.ablate import side_by_side_speed

    with pytest.raises(ConfigError, match="time it with pnnh bench"):
        side_by_side_speed([(Variant("odd", "pnnh{d}", {"coder": "a:b"}), 20)])


@pytest.mark.parametrize("label, other, tolerance, at_most", [
    ("plain-dirac-eq", "pnnh", 0.01, False),   # dirac plain at the default PNNH's parameter count
    ("pnnh-w1.0625", "resnet", 0.005, True),   # PNNH widened to its ResNet twin's count, not above it
])
def test_equal_parameter_variants_match_what_they_say(label, other, tolerance, at_most):
    import pnnh

    def params(v):
        return sum(p.numel() for p in pnnh.create_model(v.template.format(d=56), **v.kwargs).parameters())

    a, b = params(VARIANTS[label]), params(VARIANTS[other])
    assert abs(a - b) <= tolerance * b, (a, b)
    assert a <= b or not at_most, (a, b)


def test_parameter_counts_stated_in_variant_docs_are_true():
    import re

    import pnnh

    stated = {label: int(m.group(1).replace(",", "")) for label, v in VARIANTS.items()
              if (m := re.search(r"\(([\d,]+) at d56", v.doc))}
    assert len(stated) >= 7
    for label, count in stated.items():
        v = VARIANTS[label]
        assert sum(p.numel() for p in pnnh.create_model(v.model(56), **v.kwargs).parameters()) == count, label


def test_dry_run_into_a_new_directory_reports_every_run_missing(tmp_path, capsys):
    """A dry run before anything trained: no error, the report lists the runs as not run."""
    out, report = tmp_path / "new" / "abl", tmp_path / "r.md"
    main(["ablate", "--variants", "vit,pnnh-vit-block", "--depths", "12", "--seeds", "0,1", "--budgets", "vit-e20",
          "--out", str(out), "--report", str(report), "--reference", "vit", "--dry-run", "--frontier"])
    text = report.read_text()
    assert "not run: seeds [0, 1]" in text and (out / "report.html").exists()
    assert "no run finished yet" in text and "mixed" not in text
    assert "## Accuracy against cost: vit-e20 budget, depth 12" in text and not list(report.parent.glob("*.png"))
    assert "vit-e20 budget = {'epochs': 20, 'optimizer': 'adamw'" in text  # the budget's own recipe is stated


def test_vit_variants_name_registered_models():
    import pnnh

    for label in ("vit", "plain-vit", "pnnh-vit-sublayer", "pnnh-vit-block", "dirac-vit", "skipless-vit", "skipless-vit-vsi"):
        v = VARIANTS[label]
        pnnh.create_model(v.model(12), **v.kwargs)


def test_frontier_joins_the_widths_of_a_design_and_states_cost_ratios(tmp_path):
    def rec(variant, model, kwargs, seed, acc, params):
        return {"budget": "long", "depth": 56, "variant": variant, "model": model, "kwargs": kwargs, "seed": seed,
                "summary": {"status": "complete", "test_acc": acc, "train_img_per_s": 1.0, "wall_s": 1.0,
                            "params": params}}

    recs = [rec("resnet", "resnet56", {}, s, a, 1000) for s, a in ((0, 0.93), (1, 0.95))]
    recs += [rec("resnet-w0.5", "resnet56", {"width": 0.5}, s, a, 250) for s, a in ((0, 0.90), (1, 0.92))]
    recs += [rec("pnnh-w0.7", "pnnh56", {"width": 0.7, "coder": "x"}, s, a, 500) for s, a in ((0, 0.93), (1, 0.93))]
    speed = [{"model": "resnet56", "kwargs": {}, "img_s": 100.0}, {"model": "pnnh56", "kwargs": {"width": 0.7,
                                                                                                   "coder": "x"},
                                                                  "img_s": 150.0}]
    (front,) = frontiers(recs, speed, reference="resnet")
    head, *rows = front["table"]
    assert head == ["design", "variant", "width", "params", "params × resnet", "test acc %", "Δ acc vs resnet",
                    "train img/s (side by side)", "speed × resnet", "train loss, last epoch"]
    by_variant = {r[1]: r for r in rows}
    assert by_variant["resnet-w0.5"][:5] == ["resnet", "resnet-w0.5", "0.5", "250", "0.250"]  # one design, two widths
    assert by_variant["pnnh-w0.7"][0] == "pnnh-w0.7" and by_variant["pnnh-w0.7"][-2] == "1.500"
    assert by_variant["pnnh-w0.7"][6] == "-1.00 ± 1.00" and by_variant["resnet-w0.5"][-2] == "—"  # speed not measured
    assert by_variant["resnet"][-1] == "—"  # no metrics.jsonl: no loss curve
    assert set(front["figures"]) == {"frontier_long_d56_params", "frontier_long_d56_speed"}
    links = write_frontier_figures([front], tmp_path / "docs" / "cost.md")
    assert (tmp_path / "docs" / links["frontier_long_d56_params"]).read_bytes()[:4] == b"\x89PNG"
    text = format_report(recs, "cmd", fronts=[front], figure_links=links)
    assert "## Accuracy against cost: long budget, depth 56" in text and "(cost_frontier_long_d56_speed.png)" in text
    # a budget that trains in bf16 takes only speeds timed in bf16
    (front,) = frontiers(recs, speed, reference="resnet", budget_defs={"long": {"epochs": 5, "amp": "bf16"}})
    assert {r[1]: r[-2] for r in front["table"][1:]}["pnnh-w0.7"] == "—"
    bf16 = [{**s, "amp": "bf16", "img_s": s["img_s"] * 2} for s in speed]
    (front,) = frontiers(recs, speed + bf16, reference="resnet", budget_defs={"long": {"epochs": 5, "amp": "bf16"}})
    assert {r[1]: r[-3] for r in front["table"][1:]}["pnnh-w0.7"] == "300"
