"""`pnnh bench`: structure and sanity of the side-by-side measurements, on tiny models."""

import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import pnnh
from pnnh.bench import BenchConfig, count_flops, format_table, matmul_peak, run_bench
from pnnh.cli import cli
from pnnh.errors import ConfigError, ModelNotFoundError

TINY = dict(batch_size=8, repeats=2, steps=1, warmup=1, threads=1, peak_size=128, model_kwargs={"width": 0.25})


@pytest.fixture(scope="module")
def both_modes():
    return run_bench(BenchConfig(models=["resnet20", "plain20"], mode="both", **TINY))


def test_rows_cover_every_model_and_mode_with_sane_values(both_modes):
    rows = both_modes["rows"]
    assert [(r["mode"], r["model"]) for r in rows] == [
        ("train", "resnet20"), ("train", "plain20"), ("infer", "resnet20"), ("infer", "plain20")]
    params = sum(p.numel() for p in pnnh.create_model("resnet20", width=0.25).parameters())
    for r in rows:
        assert r["params"] == params  # plain twin: same layers, same count
        ms = r["step_ms"]
        assert 0 < ms["min"] <= ms["median"] <= ms["max"]
        assert r["img_per_s"] == pytest.approx(8 / (ms["median"] / 1e3))
        assert len(r["rounds_s"]) == 2 and r["ratio"] > 0
        assert 0 < r["peak_frac"] < 2  # achieved FLOP/s is a fraction of the matmul peak
        assert r["peak_mem_mb"] > 0
    first = {m: next(r for r in rows if r["mode"] == m) for m in ("train", "infer")}
    assert first["train"]["ratio"] == 1.0 and first["infer"]["ratio"] == 1.0
    train, infer = first["train"], first["infer"]
    # backward costs about twice the forward (input and weight gradients; the stem needs no input grad)
    assert 2.5 < train["flops_per_img"] / infer["flops_per_img"] <= 3.0
    assert train["peak_mem_mb"] > infer["peak_mem_mb"]  # activations kept for backward, grads, momentum
    assert both_modes["peak"]["gflops_per_s"]["float32"] > 0
    assert len(both_modes["peak"]["rounds_gflops_per_s"]["float32"]) == 4  # every round of both modes
    table = format_table(both_modes)
    assert "ratio" in table and "plain20" in table and "matmul peak" in table
    long = {**both_modes, "rows": [{**r, "model": "pnnh_vit_mini_d12:coder=block:fused"} for r in both_modes["rows"]]}
    head, _, *rows = format_table(long).splitlines()[:2 + len(long["rows"])]
    assert all(len(row) == len(head) for row in rows)  # every column lines up under its header


def test_flops_are_counted_exactly_for_a_conv():
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    x = torch.randn(5, 2, 8, 8)
    assert count_flops(conv, x, train=False) == 5 * 2 * (4 * 2 * 9) * 64  # 2 FLOPs per multiply-add
    assert count_flops(conv, x.requires_grad_(), train=True) == 3 * 5 * 2 * (4 * 2 * 9) * 64


def test_matmul_peak_is_positive_and_finite():
    assert 1e6 < matmul_peak("cpu", torch.float32, n=64, repeats=2) < 1e15


def test_fused_spec_benchmarks_the_deployed_model():
    res = run_bench(BenchConfig(models=["plain20", "plain20:fused"], mode="infer", memory=False, peak=False, **TINY))
    plain, fused = res["rows"]
    assert fused["model"] == "plain20:fused" and fused["params"] == plain["params"]
    assert fused["flops_per_img"] == pytest.approx(plain["flops_per_img"], rel=1e-6)  # BN costs no counted FLOPs
    assert fused["peak_frac"] is None and fused["peak_mem_mb"] is None


def test_key_value_spec_parts_are_model_options_of_that_spec():
    res = run_bench(BenchConfig(models=["pnnh20", "pnnh20:path_param=init", "pnnh20:width=0.5"], mode="train",
                                memory=False, peak=False, **TINY))
    dirac, init, wide = res["rows"]
    assert init["model"] == "pnnh20:path_param=init"
    assert dirac["params"] > init["params"]  # alpha and beta per filter: the parametrisation is on
    assert wide["params"] > dirac["params"]  # width=0.5 over the config's width=0.25
    with pytest.raises(ConfigError, match="key=value"):
        run_bench(BenchConfig(models=["pnnh20:=3"], **TINY))


def test_per_model_options_apply_to_that_model_only():
    res = run_bench(BenchConfig(models=["plain20", "plain20:channels_last:bf16"], mode="infer", memory=False, **TINY))
    plain, variant = res["rows"]
    assert (plain["dtype"], variant["dtype"]) == ("float32", "bfloat16")
    assert set(res["peak"]["gflops_per_s"]) == {"float32", "bfloat16"}  # each row against its own dtype's peak
    assert variant["peak_frac"] > 0


def test_bf16_on_a_cpu_without_native_bf16_is_flagged(monkeypatch):
    import pnnh.bench.bench as bench
    import pnnh.train.device as device

    monkeypatch.setattr(device, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(bench, "cpu_bf16_native", lambda: False)
    lines = []
    res = run_bench(BenchConfig(models=["plain20", "plain20:bf16"], mode="infer", memory=False, peak=False, **TINY),
                    log=lines.append)
    assert res["machine"]["cpu_bf16_native"] is False
    assert sum(l.startswith("warning: amp bf16 on a CPU without native bf16") for l in lines) == 1


def test_bad_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="inference only"):
        BenchConfig(models=["plain20:fused"], mode="train").validate()
    with pytest.raises(ConfigError, match="options after the name"):
        BenchConfig(models=["plain20:onnx"]).validate()
    with pytest.raises(ConfigError, match="at most one"):
        BenchConfig(models=["plain20:bf16:fp16"]).validate()
    with pytest.raises(ModelNotFoundError, match="plain20"):
        BenchConfig(models=["plian20"]).validate()
    with pytest.raises(ConfigError, match="mode"):
        BenchConfig(models=["plain20"], mode="eval").validate()


def test_cli_prints_a_table_and_json(tmp_path):
    args = ["bench", "--models", "plain20,resnet20", "--batch-size", "4", "--repeats", "1", "--steps", "1",
            "--warmup", "0", "--threads", "1", "-k", "width=0.25", "--mode", "infer", "--no-memory",
            "--peak-size", "64"]
    res = CliRunner().invoke(cli, args + ["--json", "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["model"] for r in data["rows"]] == ["plain20", "resnet20"]
    assert json.loads((tmp_path / "b.json").read_text())["config"]["input_size"] == 28
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "img/s" in res.stdout and "ratio" in res.stdout
