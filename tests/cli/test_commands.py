"""`pnnh models` and `pnnh compare` do what their help says."""

import json

from click.testing import CliRunner

import pnnh
from pnnh.cli import cli
from pnnh.models import list_models, model_info


def _params(name: str) -> int:
    return sum(p.numel() for p in pnnh.create_model(name).parameters())


def test_models_lists_the_matching_names_with_their_sizes():
    res = CliRunner().invoke(cli, ["models", "resnet5*"])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.output.splitlines()[1:]]
    assert [r[0] for r in rows] == list_models("resnet5*") == ["resnet50", "resnet56"]
    assert rows[0][1:4] == ["resnet", "50", "imagenet"] and rows[1][1:4] == ["resnet", "56", "cifar"]
    assert [r[4] for r in rows] == [f"{_params(r[0]) / 1e6:.3f}M" for r in rows]


def test_models_json_and_family_filter():
    res = CliRunner().invoke(cli, ["models", "--family", "pnnh_vit", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == list_models(family="pnnh_vit") and len(rows) == 6
    assert all(r["family"] == "pnnh_vit" and r["depth"] == model_info(r["name"]).depth for r in rows)
    assert rows[0]["params"] == _params(rows[0]["name"])


def test_models_without_a_match_is_an_error():
    res = CliRunner().invoke(cli, ["models", "nothing*"])
    assert res.exit_code != 0 and "no model matches" in str(res.exception)


def test_compare_trains_each_model_with_one_recipe_and_reuses_finished_runs(tmp_path, fmnist_small):
    args = ["compare", "--models", "plain8,pnnh8", "--steps", "3", "--data-dir", str(fmnist_small), "--out",
            str(tmp_path)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    summaries = {n: json.loads((tmp_path / n / "summary.json").read_text()) for n in ("plain8", "pnnh8")}
    for name, s in summaries.items():
        assert s["steps"] == 3 and s["params"] == _params(name) and s["seed"] == 0
        row = next(line for line in res.output.splitlines() if line.startswith(name + " "))
        assert row.split()[1:3] == [f"{s['params'] / 1e6:.3f}M", f"{s['test_acc'] * 100:.1f}%"]
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    for name, s in summaries.items():  # finished runs are not trained again
        assert json.loads((tmp_path / name / "summary.json").read_text())["curve"] == s["curve"]
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) == 1
