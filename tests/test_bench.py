"""The benchmark runner: schema, derived columns, compare, CLI (timings themselves live in bench/)."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from ftkernels.bench import runner


def _fake_suite(device, quick=False, ceilings=None, dtype=None):
    rows = [
        dict(case="fast", baseline="torch", baseline_ms=10.0, ours_ms=2.5, floor_ms=2.0, ours_mem_MB=3, floor_mem_MB=2),
        dict(case="slow", baseline="torch", baseline_ms=3.0, ours_ms=6.0, floor_ms=1.5),
    ]
    return rows, {"copy_seen": ceilings["copy_GBps"]}


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(runner.SUITES, "fake", _fake_suite)
    monkeypatch.setattr(
        runner,
        "measure_ceilings",
        lambda d, q=False, dt=None: {"copy_GBps": 10.0, "matmul_TFLOPs": 1.0, "matmul_dtype": "f"},
    )


def test_derived_columns_and_schema(fake, tmp_path):
    res = runner.run_suites(["fake"], torch.device("cpu"), progress=None)
    rows = runner.all_rows(res)
    assert [r["speedup"] for r in rows] == [4.0, 0.5]
    assert [r["ours_vs_floor"] for r in rows] == [1.25, 4.0]
    assert [r.get("ours_mem_vs_floor") for r in rows] == [1.5, None]  # only where both peaks exist
    assert res["suites"]["fake"]["extra"] == {"copy_seen": 10.0}
    for key in ("device", "torch", "triton", "ftkernels", "date", "git_commit"):
        assert key in res["environment"]
    js, md = runner.write(str(tmp_path), res)
    back = json.loads(pathlib.Path(js).read_text())
    assert runner.all_rows(back) == rows
    text = pathlib.Path(md).read_text()
    assert "| fake | fast | torch | 10 | 2.5 | 4 |" in text


def test_compare_shows_change(fake, tmp_path):
    a = runner.run_suites(["fake"], torch.device("cpu"), progress=None)
    b = json.loads(json.dumps(a))
    b["suites"]["fake"]["rows"][0]["ours_ms"] = 5.0  # twice as slow
    del b["suites"]["fake"]["rows"][1]
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    out = runner.compare(str(pa), str(pb))
    assert "+100.0%" in out and "gone" in out


def test_compare_matches_rows_by_baseline_too(monkeypatch, tmp_path):
    """One case has a row per baseline (the floor, PEFT, ...): each row is compared with its own."""

    def two_baselines(device, quick=False, ceilings=None, dtype=None):
        return [
            dict(case="layer", baseline="floor", baseline_ms=4.0, ours_ms=5.0),
            dict(case="layer", baseline="PEFT", baseline_ms=10.0, ours_ms=5.0),
        ], {}

    monkeypatch.setitem(runner.SUITES, "two", two_baselines)
    monkeypatch.setattr(
        runner, "measure_ceilings", lambda d, q=False, dt=None: {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0}
    )
    a = runner.run_suites(["two"], torch.device("cpu"), progress=None)
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(a))
    lines = [ln for ln in runner.compare(str(pa), str(pb)).splitlines() if ln.startswith("two ")]
    assert len(lines) == 2
    assert lines[0].split()[-2:] == ["0.8", "0.8"] and lines[1].split()[-2:] == ["2", "2"]


def test_unknown_suite_is_named():
    with pytest.raises(ValueError, match="available: lora_linear, lora_conv, masked, loreft, optimizer, e2e"):
        runner.run_suites(["nope"], torch.device("cpu"), progress=None)


def test_cli_quick_optimizer_suite(tmp_path):
    cmd = [sys.executable, "-m", "ftkernels", "bench", "--quick", "--suite", "optimizer", "--out", str(tmp_path)]
    if _has_matplotlib():
        cmd.append("--plot")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "adamw fp32, no options" in out and "adamw bf16, no options" in out
    res = json.loads((tmp_path / "results.json").read_text())
    rows = res["suites"]["optimizer"]["rows"]
    assert len(rows) == 3
    for r in rows:
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0
        assert abs(r["speedup"] - r["baseline_ms"] / r["ours_ms"]) < 1e-12
    assert res["ceilings"]["copy_GBps"] > 0 and res["ceilings"]["matmul_TFLOPs"] > 0
    if _has_matplotlib():
        assert (tmp_path / "speedup.png").stat().st_size > 1000


def test_dtype_option_reaches_the_cases_and_the_floors():
    from ftkernels.bench import lora_conv, lora_linear, optimizer

    res = runner.run_suites(["optimizer"], torch.device("cpu"), quick=True, progress=None, dtype=torch.float16)
    assert res["dtype"] == "float16" and res["ceilings"]["matmul_dtype"] == "float16"
    rows = res["suites"]["optimizer"]["rows"]
    assert [r["case"] for r in rows] == ["adamw fp16, no options", "adamw fp16, mask+dropout+L1+L2-SP+clip"]
    numel, bw = res["suites"]["optimizer"]["extra"]["numel"], res["ceilings"]["copy_GBps"] * 1e9
    # 16-bit params and state: 7 two-byte passes plain; + anchor, g again and the mask bits with options
    assert rows[0]["floor_ms"] == pytest.approx(numel * 14 / bw * 1e3)
    assert rows[1]["floor_ms"] == pytest.approx(numel * 18.125 / bw * 1e3)
    assert "Per-layer cases in float16" in runner.to_markdown(res)

    cpu = torch.device("cpu")
    assert {c["dtype"] for c in lora_linear.cases(cpu, True)} == {torch.float32}
    assert {c["dtype"] for c in lora_linear.cases(cpu, True, torch.bfloat16)} == {torch.bfloat16}
    assert lora_conv._settings(cpu, True)["autocast"] is None
    assert lora_conv._settings(cpu, True, torch.bfloat16)["autocast"] is torch.bfloat16
    assert lora_conv._settings(cpu, True, torch.float32)["autocast"] is None
    assert optimizer.bytes_plain(torch.float32) == 28 and optimizer.bytes_all(torch.float32) == 36.125


def test_cli_bad_arguments_fail_before_any_benchmark(tmp_path, monkeypatch, capsys):
    from ftkernels import cli

    ran = []
    monkeypatch.setattr(runner, "run_suites", lambda *a, **k: ran.append(a))
    not_results = tmp_path / "x.json"
    not_results.write_text('{"a": 1}')
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (["--device", "tpu"], "--device 'tpu'"),
        (["--device", "meta"], "--device must be cpu or cuda"),
        (["--compare", str(tmp_path / "none.json"), str(not_results)], "none.json: No such file"),
        (["--compare", str(not_results), str(not_results)], "not both bench results files"),
        (["--out", str(blocker / "sub")], "cannot write there"),  # a file where a folder must go
        (["--plot"], "--plot needs --out"),
        (["--dtype", "int8"], "invalid choice"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(["bench", *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert ran == []


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_lora_linear_suite_rows(monkeypatch):
    from ftkernels.bench import lora_linear

    tiny = [dict(M=64, K=48, N=40, r=4, p=p, dtype=torch.float32, sweep=False) for p in (0.1, 0.0)]
    monkeypatch.setattr(lora_linear, "cases", lambda device, quick, dtype=None: tiny)
    res = runner.run_suites(["lora_linear"], torch.device("cpu"), quick=True, progress=None)
    rows = res["suites"]["lora_linear"]["rows"]
    trio = [r for r in rows if r["case"].startswith("q/k/v of one x")]
    dora = [r for r in rows if r["case"].startswith("DoRA")]
    lora_bias = [r for r in rows if r["case"].startswith("LoRA bias")]
    mha = [r for r in rows if r["case"].startswith("MultiheadAttention")]
    rows = [r for r in rows if r not in trio and r not in dora and r not in mha and r not in lora_bias]
    # LoRA on nn.MultiheadAttention against PEFT's layer and the frozen one; PEFT saves more (its
    # merged weights are part of the graph)
    assert sorted(r["baseline"] for r in mha) == ["PEFT eager", "frozen MHA (floor)"]
    for r in mha:
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0 and r["floor_ms"] > 0
    assert next(r for r in mha if r["baseline"] == "PEFT eager")["baseline_saved_MB"] > mha[0]["ours_saved_MB"]
    # DoRA: the two headline cases against PEFT's DoRA layer and the frozen base
    assert sorted(r["baseline"] for r in dora) == ["PEFT eager (DoRA)"] * 2 + ["frozen base layer (floor)"] * 2
    for r in dora:
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0 and r["floor_ms"] > 0
        if r["baseline"] == "PEFT eager (DoRA)":  # PEFT also keeps its dropped x / its own products
            assert r["baseline_saved_MB"] > r["ours_saved_MB"]
    # LoRA bias: the same two cases against PEFT's lora_bias layer; ours saves what plain LoRA saves
    want = ["PEFT eager (LoRA bias)"] * 2 + ["frozen base layer (floor)"] * 2
    assert sorted(r["baseline"] for r in lora_bias) == want
    for r in lora_bias:
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0 and r["floor_ms"] > 0
        assert abs(r["ours_saved_MB"] - (64 * 48 + 64 * 4) * 4 / 2**20) < 1e-12
    baselines = [r["baseline"] for r in rows]
    # p=0.1: base and PEFT; p=0: also the hand-written cuBLAS technique
    assert baselines.count("PEFT eager") == 2 and baselines.count("hand-written cuBLAS + addmm_") == 1
    # The q/k/v case: grouped against the same layers alone, PEFT and the frozen trio.
    assert sorted(r["baseline"] for r in trio) == ["PEFT eager", "frozen q/k/v (floor)", "ours, each layer alone"]
    alone = next(r for r in trio if r["baseline"] == "ours, each layer alone")
    assert alone["baseline_saved_MB"] == alone["ours_saved_MB"] > 0  # grouping saves the same tensors
    for r in rows:
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0 and r["floor_ms"] > 0 and r["ours_vs_base"] > 0
        # x (64 x 48 fp32) and u (64 x 4) for ours (the C++ node keeps the seed as a number); PEFT also keeps
        # its dropped copy of x
        assert abs(r["ours_saved_MB"] - (64 * 48 + 64 * 4) * 4 / 2**20) < 1e-12
        if r["baseline"] == "PEFT eager" and "p0.1" in r["case"]:
            assert r["baseline_saved_MB"] > r["ours_saved_MB"] + 64 * 48 * 4 / 2**20 * 0.99


def test_cpu_peak_memory_counts_live_tensors():
    """Two 4 MB tensors alive at once (the third is made after one is freed): a peak of 8 MB."""
    from ftkernels.bench.common import cpu_peak_extra_mb

    x = torch.randn(1000, 1000)

    def f():
        y = x * 2
        z = y + 1
        del y
        return z * 3

    assert cpu_peak_extra_mb(f) == pytest.approx(2 * x.numel() * 4 / 2**20, rel=0.01)


@pytest.mark.cuda
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_graphed_lora_step_matches_eager_steps(dropout):
    """Our LoRA layers and FusedAdamW captured in one CUDA graph (the e2e suite's graphed variant):
    3 warm-up steps, the capture's own replay and one more land where 5 eager steps do (dropout: the
    same loss trend, the masks differ by RNG offsets)."""
    import copy

    from torch import nn

    import ftkernels as ftk
    from ftkernels.bench.e2e import _step, graphed_step

    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 8)).to(dev)
    models = [ftk.apply_lora(copy.deepcopy(base), ["0", "2"], r=4, dropout=dropout) for _ in range(2)]
    for m in models:
        for q in m.modules():
            if isinstance(q, ftk.nn.LoRALinear):
                nn.init.normal_(q.lora_B, std=0.1)
        m.load_state_dict(models[0].state_dict())
    x, y = torch.randn(32, 64, device=dev), torch.randint(0, 8, (32,), device=dev)
    loss_fn = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    opts = [ftk.optim.FusedAdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    replay = graphed_step(models[0], opts[0], loss_fn, dev, None, warmup=3)  # 4 steps taken
    replay()
    eager = _step(models[1], opts[1], loss_fn, dev, None)
    for _ in range(5):
        eager()
    torch.cuda.synchronize()
    if dropout == 0:
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        assert abs(loss_fn(models[0]).item() - loss_fn(models[1]).item()) < 0.2


_TWO_GRAPHS = """
import sys, torch
from ftkernels.bench import e2e
from ftkernels.optim import FusedAdamW
dev = torch.device("cuda")
name, fns, parts = e2e.eager_steps(e2e._bert, dev, quick=sys.argv[1] == "quick")
tr = lambda m: [p for p in m.parameters() if p.requires_grad]
pm, om, loss = parts["peft_model"], parts["ours"], parts["loss_fn"]
peft = e2e.graphed_step(pm, torch.optim.AdamW(tr(pm), lr=1e-4, fused=True, capturable=True), loss, dev, None)
peft(); torch.cuda.synchronize()
ours = e2e.graphed_step(om, FusedAdamW(tr(om), lr=1e-4), loss, dev, None)
ours(); torch.cuda.synchronize()
peft(); torch.cuda.synchronize()
print("ok")
"""


@pytest.mark.cuda
@pytest.mark.parametrize("size", ["quick", "full"])
def test_graph_captured_before_ours_still_replays(size):
    """The H100 failure of 2026-11-23 (BERT-base): PEFT's graph replayed, ours was captured and
    replayed, then PEFT's replay hit an illegal address. Cause: graphed_step returned only the
    graph's replay, so the optimizer (its state, which the graph writes) was freed after capture,
    and the next capture's cache flush unmapped it. The returned step (a GraphedTrainStep) now holds it. A
    subprocess, so a poisoned CUDA context would stay out of the other tests."""
    r = subprocess.run([sys.executable, "-c", _TWO_GRAPHS, size], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_profile_e2e_script_breakdown(tmp_path):
    """scripts/profile_e2e.py on the tiny BERT case: every eager variant profiled, classes and
    counts per step, and the grouped model running fewer backward nodes than the same layers alone."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "profile_e2e.py"
    spec = importlib.util.spec_from_file_location("profile_e2e", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.op_class("aten::addmm") == "gemm/conv" and mod.op_class("aten::_to_copy") == "casts"
    assert mod.op_class("_lora_down_kernel") == "ours (triton)" and mod.op_class("aten::add_") == "other"
    out = tmp_path / "p.json"
    assert mod.main(["--case", "bert", "--quick", "--steps", "1", "--json", str(out)]) == 0
    (res,) = json.loads(out.read_text())["results"].values()
    assert set(res) == {"floor", "PEFT eager", "ours", "ours, each LoRA layer alone", "ours, LoRA inputs saved"}
    cuda = torch.cuda.is_available()  # the script profiles the default device
    for r in res.values():
        assert r["wall_ms"] > 0 and r["aten_ops"] > 0 and r["gemm_calls"] > 0
        assert r["device_ms"] > 0 if cuda else r["python_ms"] >= 0  # kernel time on GPU, uncovered host time on CPU
    assert res["ours"]["backward_nodes"] < res["ours, each LoRA layer alone"]["backward_nodes"]
    if not cuda:  # CPU counts cast ops (PEFT's per-layer input casts); GPU counts cast kernels
        assert res["PEFT eager"]["casts"] > res["ours"]["casts"]


def _diag_kernels():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "diag_kernels.py"
    spec = importlib.util.spec_from_file_location("diag_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_diag_kernels_needs_a_gpu_and_names_its_groups(capsys):
    mod = _diag_kernels()
    assert set(mod.GROUPS) == {"lora", "loreft", "masked"}
    if not torch.cuda.is_available():
        assert mod.main(["--quick"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.cuda
def test_diag_kernels_quick_times_every_group(tmp_path):
    out = tmp_path / "diag.json"
    assert _diag_kernels().main(["--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["group"] for r in rows} == {"lora", "loreft", "masked"}
    assert all(r["us"] > 0 and r["floor_us"] > 0 for r in rows)


def test_masked_wgrad_floor_counts_touched_sectors():
    """The masked weight gradient's bytes floor: g is read in 32-byte sectors, so 10% random columns
    of a bf16 4096-wide g touch ~81.6% of it (1 - C(4080, 410) / C(4096, 410)), a contiguous block 10%."""
    import math

    from ftkernels.bench.masked import touched_bytes, wgrad_floor_ms

    assert touched_bytes(3, torch.tensor([0, 1, 15]), 2) == 3 * 32  # one sector of 16 bf16
    assert touched_bytes(3, torch.tensor([0, 16, 40]), 2) == 3 * 3 * 32
    assert touched_bytes(1, torch.tensor([7]), 4) == 32  # fp32: 8 a sector
    gen = torch.Generator().manual_seed(0)
    cols = torch.randperm(4096, generator=gen)[:410]
    want = 1 - math.comb(4080, 410) / math.comb(4096, 410)
    assert abs(touched_bytes(1, cols, 2) / (4096 * 2) - want) < 0.03
    assert touched_bytes(1, torch.arange(2048, 2048 + 410), 2) == 26 * 32  # 820 bytes from an aligned start
    # The H100 case (bench/NOTES.md, session 14): 67.1 MB of x + ~54.7 MB of g + 33.6 MB written at
    # 3.0 TB/s = ~51.8 us, above the 37.7 us of flops at 730 TFLOP/s; a block is flops-bound.
    floor = wgrad_floor_ms(8192, 4096, 4096, cols, 2, 730e12, 3.0e12)
    assert 0.050 < floor < 0.0535
    assert wgrad_floor_ms(8192, 4096, 4096, torch.arange(2048, 2458), 2, 730e12, 3.0e12) == pytest.approx(
        2 * 8192 * 4096 * 410 / 730e12 * 1e3
    )


def test_input_sets_stream_twice_the_cache(monkeypatch):
    """Enough fresh input sets that cycling through them moves twice the last-level cache (capped), one
    set when a set alone is that large; every set holds different values."""
    from ftkernels.bench import common

    monkeypatch.setattr(common, "cache_bytes", lambda device: 1000 * 4)
    cpu = torch.device("cpu")
    sets = common.input_sets(lambda: (torch.randn(100), torch.randn(150)), cpu)
    assert len(sets) == 8  # ceil(8000 / 1000 bytes) = 8
    assert len(common.input_sets(lambda: torch.randn(300), cpu)) == 7  # ceil(8000 / 1200)
    assert len(common.input_sets(lambda: torch.randn(30), cpu, cap=3)) == 3
    assert len(common.input_sets(lambda: torch.randn(2000), cpu)) == 1
    firsts = [s[0] for s in sets]
    assert all(not torch.equal(a, b) for a, b in zip(firsts, firsts[1:], strict=False))


def test_cache_bytes_reads_the_last_level_cache():
    """CPU: the largest size sysfs lists for cpu0 (or the 32 MiB default): at least an L1's size."""
    from ftkernels.bench.common import cache_bytes

    n = cache_bytes(torch.device("cpu"))
    assert isinstance(n, int) and n >= 2**15


def test_layer_step_cycles_through_the_input_sets():
    """Each call of a rotating step takes the next x/g pair: after one round every x has its own grad,
    equal to the layer's grad_x for its own g."""
    from ftkernels.bench.common import layer_step, step_inputs

    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3, dtype=torch.float64)
    xs, gs = step_inputs((4, 5), (4, 3), torch.device("cpu"), torch.float64)
    xs, gs = (xs * 3)[:3], (gs * 3)[:3]  # at least three sets, whatever the machine's cache
    step = layer_step(lin, xs, gs)
    for _ in range(3):
        step()
    for x, g in zip(xs, gs, strict=True):
        torch.testing.assert_close(x.grad, g @ lin.weight)
