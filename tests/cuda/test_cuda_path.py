"""The CUDA path: loader, engine, AMP (bf16; fp16 with a grad scaler), torch.compile of a training
step, channels-last and deploy/fuse parity, on a CUDA device.

Every test here carries the ``cuda`` marker (``pytest -m cuda`` selects them; ``scripts/gpu_check.sh``
runs them) and is skipped, with that reason, where no CUDA device is available. Parity checks turn
TF32 off so that CUDA results can be held to float32 tolerances.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pnnh
from pnnh.bench import BenchConfig, deploy, run_bench
from pnnh.data import load_dataset
from pnnh.data.loader import InMemoryLoader
from pnnh.train import TrainConfig, train
from pnnh.train.checkpoint import load_weights
from pnnh.train.engine import evaluate

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NETS = ("resnet8", "plain8", "pnnh8")  # one of each family: residual, plain, PNNH


@pytest.fixture
def no_tf32():
    """float32 convolutions and matmuls in full precision (CUDA's TF32 keeps 10 mantissa bits)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in the Frobenius norm, on the CPU in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def grad_vector(model: nn.Module) -> torch.Tensor:
    """All parameter gradients as one vector (a per-tensor comparison would divide by the
    near-zero gradients of biases that a BatchNorm follows)."""
    return torch.cat([p.grad.detach().flatten() for p in model.parameters()])


def run_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(model="resnet20", data="fashion-mnist", train_subset=1024, test_subset=256, batch_size=64,
                epochs=3, progress=False, device="cuda", out=str(tmp_path / "run"), model_kwargs={"width": 0.5})
    base.update(kw)
    return TrainConfig(**base)


def random_bn_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so folding them is really tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


# --------------------------------------------------------------------------------------------------
# loader and engine
# --------------------------------------------------------------------------------------------------

def test_loader_on_cuda_gives_the_cpu_batches_in_channels_last(fmnist_small):
    ds = load_dataset("fashion-mnist", "train", str(fmnist_small)).subset(256)
    kw = dict(train=True, augment=True, seed=3, channels_last=True)
    cpu = list(InMemoryLoader(ds, 32, **kw))
    gpu = list(InMemoryLoader(ds, 32, device="cuda", **kw))
    assert len(gpu) == len(cpu) == 8
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.device.type == "cuda" and xg.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, rtol=1e-6, atol=1e-6)


def test_engine_trains_on_cuda_and_its_weights_evaluate_the_same_on_cpu(tmp_path, fmnist_small):
    s = train(run_cfg(tmp_path, data_dir=str(fmnist_small)))
    assert s["device"].startswith("cuda") and s["test_acc"] > 0.3  # 10 classes: chance is 0.1
    model = pnnh.create_model("resnet20", num_classes=10, in_chans=1, width=0.5, img_size=28)
    load_weights(tmp_path / "run" / "model.safetensors", model)
    test = load_dataset("fashion-mnist", "test", str(fmnist_small)).subset(256)
    cpu = evaluate(model, InMemoryLoader(test, 256, train=False), torch.device("cpu"))
    assert abs(cpu["acc"] - s["test_acc"]) <= 2 / 256  # TF32 on CUDA may flip a borderline image


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_engine_trains_with_amp(tmp_path, fmnist_small, amp):
    s = train(run_cfg(tmp_path, data_dir=str(fmnist_small), amp=amp, model="pnnh20", model_kwargs={}))
    assert s["test_acc"] > 0.3 and s["test_loss"] == s["test_loss"]  # learned, and the loss is not NaN


def test_grad_scaler_skips_an_overflowing_fp16_step_and_lowers_its_scale():
    model = pnnh.create_model("pnnh8", num_classes=10, in_chans=1).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    x = torch.randn(16, 1, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device="cuda")

    def step(loss_factor: float) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y) * loss_factor
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    before = [p.detach().clone() for p in model.parameters()]
    step(float("inf"))  # every gradient overflows: the step is skipped, the scale halves
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0**15
    step(1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights


# --------------------------------------------------------------------------------------------------
# torch.compile and channels-last
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NETS)
def test_compiled_training_step_matches_eager(name, no_tf32):
    torch._dynamo.reset()
    model = pnnh.create_model(name, num_classes=10, in_chans=1).cuda()
    compiled = torch.compile(model)
    x = torch.randn(32, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    grads = []
    for fwd in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        grads.append((loss.detach(), grad_vector(model)))
    (l_eager, g_eager), (l_comp, g_comp) = grads
    assert rel_err(l_comp, l_eager) < 1e-4
    err = rel_err(g_comp, g_eager)
    assert err < 1e-3, f"{name}: compiled gradients differ from eager by {err:.2e} (relative)"


def test_engine_trains_with_torch_compile(tmp_path, fmnist_small):
    torch._dynamo.reset()
    s = train(run_cfg(tmp_path, data_dir=str(fmnist_small), compile=True, model="pnnh20", model_kwargs={}))
    assert s["test_acc"] > 0.3


@pytest.mark.parametrize("name", NETS)
def test_channels_last_forward_and_backward_match_contiguous(name, no_tf32):
    model = pnnh.create_model(name, num_classes=10, in_chans=3, img_size=32).cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=fmt)
        model.zero_grad(set_to_none=True)
        out = model(x.contiguous(memory_format=fmt))
        out.square().mean().backward()
        outs.append((out.detach(), grad_vector(model)))
    (o_nchw, g_nchw), (o_nhwc, g_nhwc) = outs
    assert rel_err(o_nhwc, o_nchw) < 1e-4 and rel_err(g_nhwc, g_nchw) < 1e-3


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_training_kernel_on_cuda_matches_the_reference_layer(monkeypatch, no_tf32, fmt):
    """pnnh20 trained two SGD steps on CUDA through the tied kernel and through the reference
    layers (``PNNH_KERNELS=reference``): same logits, gradients and BatchNorm running statistics."""
    from pnnh.models.kernels import TiedPNNHConv2d

    torch.manual_seed(0)
    base = random_bn_stats(pnnh.create_model("pnnh20", num_classes=10, in_chans=1))
    monkeypatch.setenv("PNNH_KERNELS", "reference")
    ref = copy.deepcopy(base).cuda().to(memory_format=fmt).train()
    monkeypatch.delenv("PNNH_KERNELS")
    fast = copy.deepcopy(base).cuda().to(memory_format=fmt).train()
    assert not any(isinstance(m, TiedPNNHConv2d) for m in ref.modules())
    assert any(isinstance(m, TiedPNNHConv2d) for m in fast.modules())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, fast)]
    x = torch.randn(16, 1, 28, 28, device="cuda").contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (16,), device="cuda")
    for _ in range(2):
        outs = []
        for m, opt in zip((ref, fast), opts):
            opt.zero_grad()
            out = m(x)
            F.cross_entropy(out, y).backward()
            outs.append((out.detach(), grad_vector(m)))
            opt.step()
        (o_ref, g_ref), (o_fast, g_fast) = outs
        assert rel_err(o_fast, o_ref) < 1e-4 and rel_err(g_fast, g_ref) < 1e-3
    for (name, b), c in zip(ref.named_buffers(), fast.buffers()):
        if b.is_floating_point():
            assert rel_err(c, b) < 1e-4, name


# --------------------------------------------------------------------------------------------------
# deployment
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NETS)
def test_deployed_model_on_cuda_matches_the_eval_model(name, no_tf32):
    model = random_bn_stats(pnnh.create_model(name, num_classes=10, in_chans=3, img_size=32)).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        moved = deploy(model).cuda()(x.cuda())  # deployed on the CPU, then moved
        on_gpu = deploy(model.cuda())(x.cuda())  # deployed from a model already on the GPU
    assert rel_err(moved, ref) < 1e-4 and rel_err(on_gpu, ref) < 1e-4


def test_bench_measures_on_cuda():
    res = run_bench(BenchConfig(models=["plain8", "plain8:fused", "plain8:bf16"], mode="infer", device="cuda",
                                batch_size=32, repeats=2, steps=2, warmup=1, peak_size=512))
    rows = {r["model"]: r for r in res["rows"]}
    assert res["machine"]["gpu"] and res["machine"]["device"].startswith("cuda")
    assert rows["plain8:bf16"]["dtype"] == "bfloat16" and rows["plain8"]["dtype"] == "float32"
    for r in rows.values():
        assert r["img_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["peak_frac"] > 0
