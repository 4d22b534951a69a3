"""Quantizing across processes (qvlquant.parallel.distributed, qvlquant.parallel.launch): the collectives in two real gloo
processes, and whole runs of the demo with ``--nproc 2`` against one process: byte-identical exports, a killed
rank that fails cleanly, and a resume after it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qvlquant.parallel.devices import resolve_device
from qvlquant.parallel.distributed import World, assign, shard
from qvlquant.parallel.launch import run_ranks, without_option

PYTHON = sys.executable


def test_shards_are_contiguous_disjoint_and_cover_every_batch():
    for n, size in [(16, 2), (7, 3), (5, 5), (64, 8)]:
        world = World(0, size)
        parts = [shard(n, world, r) for r in range(size)]
        assert [b for p in parts for b in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_assign_balances_by_size_and_is_the_same_for_every_rank():
    sizes = {"q": 16, "k": 4, "v": 4, "o": 16, "gate": 44, "up": 44, "down": 44}
    owner = assign(sizes, World(1, 2))
    assert list(owner) == list(sizes)  # the caller's order
    load = [sum(s for n, s in sizes.items() if owner[n] == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= 16 and owner == assign(sizes, World(0, 2))
    assert set(assign(sizes, World()).values()) == {0}
    assert set(assign({"a": 1, "b": 1, "c": 1}, World(0, 3)).values()) == {0, 1, 2}


def test_world_from_the_torchrun_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert World.from_env() == World()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert World.from_env() == World(3, 4, 1, 2)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK 4, WORLD_SIZE 4"):
        World.from_env()


def test_devices_of_ranks():
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        resolve_device("cuda:1", local_rank=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda", local_rank=0)


def test_without_option_drops_only_that_flag():
    argv = ["quantize", "--nproc", "2", "--method", "gptq", "--nproc=3", "--output", "o"]
    assert without_option(argv, "--nproc") == ["quantize", "--method", "gptq", "--output", "o"]


COLLECTIVES = textwrap.dedent("""
    import json, sys
    import torch
    from qvlquant.parallel import distributed as d

    world = d.World.from_env()
    d.start(world, torch.device("cpu"))
    r = world.rank
    g = torch.Generator().manual_seed(r)
    t = torch.randn(33, 17, dtype=torch.float64, generator=g)
    parts = [torch.randn(33, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
             for i in range(world.size)]
    in_order = parts[0]
    for p in parts[1:]:
        in_order = in_order + p
    out = {}
    d.CHUNK_ELEMENTS = 100  # several pieces per tensor, and a short last one
    for owners in ([0], [1], [1, 0], [2, 0]):
        expected = parts[owners[0]]  # the first owner's part, then the others in rank order
        for i in range(world.size):
            expected = expected if i == owners[0] else expected + parts[i]
        got = d.fold(t.clone(), owners, world)
        out[str(owners)] = None if got is None else bool(torch.equal(got, expected))
    out["total"] = bool(torch.equal(d.total(t, world), in_order))
    out["count"] = d.total_count(r + 1, world)
    src = {"q": torch.arange(12, dtype=torch.int32).view(3, 4), "s": torch.rand(5, generator=torch.Generator().manual_seed(9)).half(),
           "m": torch.tensor([True, False])}
    got, extra = d.broadcast_tensors(src if r == 1 else None, {"tokens": 7, "r": [1.5]}, 1, world)
    out["broadcast"] = all(torch.equal(got[k], src[k]) and got[k].dtype == src[k].dtype for k in src)
    out["extra"] = extra
    if r:
        d.send_tensors({"h": t.float()}, 0)
    else:
        out["recv"] = [bool(torch.equal(d.recv_tensors(i)["h"], parts[i].float())) for i in range(1, world.size)]
    try:
        d.check_same("same" if r < 2 else "other", "the test value", world)
        out["same"] = "ok"
    except RuntimeError as e:
        out["same"] = str(e)
    d.stop(world)
    open(sys.argv[1] + f".{r}", "w").write(json.dumps(out))
""")


def test_collectives_in_three_gloo_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    assert run_ranks(3, [PYTHON, str(script), str(tmp_path / "out")]) == 0
    outs = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(3)]
    for r, out in enumerate(outs):
        # a rank-order sum, exactly, and only on the owners
        assert out["[0]"] == (True if r == 0 else None) and out["[1]"] == (True if r == 1 else None)
        assert out["[1, 0]"] == (True if r in (0, 1) else None) and out["[2, 0]"] == (True if r in (0, 2) else None)
        assert out["total"] is True and out["count"] == 6
        assert out["broadcast"] is True and out["extra"] == {"tokens": 7, "r": [1.5]}
        assert "disagree about the test value" in out["same"]
    assert outs[0]["recv"] == [True, True]


def test_nproc_reports_the_rank_that_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    script = tmp_path / "fail.py"
    script.write_text("import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(3)\ntime.sleep(60)\n")
    proc = subprocess.run([PYTHON, "-c", f"import sys; from qvlquant.parallel.launch import run_ranks; "
                                         f"sys.exit(run_ranks(2, [sys.executable, {str(script)!r}]))"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert "rank 1 of 2 exited with code 3; the other ranks were stopped" in proc.stderr


def test_a_rank_that_crashes_prints_where_it_was(tmp_path, monkeypatch):
    """A rank killed by SIGABRT (a C++ std::terminate, say) prints its Python stack (faulthandler), so the
    failure can be traced from the log alone."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("PYTHONFAULTHANDLER", raising=False)
    script = tmp_path / "crash.py"
    script.write_text("import os, time\n\ndef deep_in_the_layer_loop():\n    os.abort()\n\n"
                      "if os.environ['RANK'] == '1':\n    deep_in_the_layer_loop()\ntime.sleep(60)\n")
    proc = subprocess.run([PYTHON, "-c", f"import sys; from qvlquant.parallel.launch import run_ranks; "
                                         f"sys.exit(run_ranks(2, [sys.executable, {str(script)!r}]))"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + 6
    assert "rank 1 of 2 was killed by signal SIGABRT" in proc.stderr
    assert "deep_in_the_layer_loop" in proc.stderr and "Fatal Python error: Aborted" in proc.stderr


# whole runs of the demo: 8 calibration samples (8 batches), one thread per process, so the single-process run
# and the ranks multiply the same shapes on the same number of threads
ARGS = ["--num-samples", "8", "--bits", "4"]


def quantize(out, method, *extra, nproc=None, check=True):
    argv = [PYTHON, "-m", "qvlquant", "quantize", "--method", method, *ARGS, *extra, "--output", str(out)]
    if nproc:
        argv += ["--nproc", str(nproc)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", QVLQUANT_QUIET="1"))
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


RULES = ["--override", r"layers\.0\.:bits=8", "--ignore", r"layers\.3\.mlp", "--override", "o_proj:method=rtn"]


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("gptq", []), ("awq", []), ("gptq", RULES)], ids=["gptq", "awq", "rules"])
def test_two_gloo_processes_write_the_single_process_export(tmp_path, method, extra):
    quantize(tmp_path / "one", method, *extra)
    quantize(tmp_path / "two", method, *extra, nproc=2)
    one, two = (tmp_path / d / "model.safetensors" for d in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()
    report = json.loads((tmp_path / "two" / "quantize_report.json").read_text())
    assert report["processes"] == 2 and len(report["peak_rss_gib_per_process"]) == 2
    assert not (tmp_path / ".two.partial").exists()


@pytest.mark.slow
def test_awq_subsampling_tokens_across_ranks_matches_one_process(tmp_path, monkeypatch):
    """AWQ keeps an even subsample of every rank's tokens (here 100 of ~320): each rank must take exactly the
    single process's picks among its own tokens."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("QVLQUANT_QUIET", "1")
    for n in (1, 2):
        code = (f"import qvlquant; qvlquant.quantize(output={str(tmp_path / str(n))!r}, method='awq', "
                f"num_samples=8, awq_max_tokens=100)")
        assert run_ranks(n, [PYTHON, "-c", code]) == 0
    assert (tmp_path / "1" / "model.safetensors").read_bytes() == (tmp_path / "2" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_torchrun_launches_the_same_job(tmp_path):
    """torchrun --nproc-per-node 2 -m qvlquant quantize ...: the environment --nproc imitates is torchrun's."""
    quantize(tmp_path / "one", "rtn")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qvlquant",
           "quantize", "--method", "rtn", *ARGS, "--output", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", QVLQUANT_QUIET="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "two" / "quantize_report.json").read_text())["processes"] == 2


KILL_RANK_1_AT_LAYER_2 = textwrap.dedent("""
    import os, signal, sys
    from qvlquant.engine import resume
    from qvlquant.cli import main

    save = resume.RankStore.save

    def save_or_die(self, i, record, hidden):
        if i == 2 and self.world.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        return save(self, i, record, hidden)

    resume.RankStore.save = save_or_die
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_killed_rank_fails_cleanly_and_the_run_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("QVLQUANT_QUIET", "1")
    script = tmp_path / "killer.py"
    script.write_text(KILL_RANK_1_AT_LAYER_2)
    out = tmp_path / "q"
    argv = ["quantize", "--method", "gptq", *ARGS, "--output", str(out)]
    proc = subprocess.run([PYTHON, "-c", f"import sys; from qvlquant.parallel.launch import run_ranks; "
                                         f"sys.exit(run_ranks(2, [sys.executable, {str(script)!r}, *{argv!r}]))"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + 9, proc.stderr[-3000:]
    assert "rank 1 of 2 was killed by signal SIGKILL" in proc.stderr
    assert not out.exists()  # nothing published
    partial = tmp_path / ".q.partial"
    assert sorted(p.name for p in partial.glob("layer_*.safetensors")) == ["layer_0000.safetensors",
                                                                          "layer_0001.safetensors"]
    resumed = quantize(out, "gptq", nproc=2)
    report = json.loads((out / "quantize_report.json").read_text())
    assert sorted(report["layer_seconds"]) == ["2", "3"]  # layers 0 and 1 came from the partial folder
    quantize(tmp_path / "one", "gptq")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()
    assert not partial.exists() and resumed.returncode == 0


@pytest.mark.slow
def test_more_processes_than_batches_is_refused(tmp_path):
    """--nproc refuses before starting any process (RELIABILITY.md 47); under torchrun each rank refuses."""
    proc = quantize(tmp_path / "q", "rtn", "--num-samples", "2", nproc=3, check=False)
    assert proc.returncode == 2 and "2 calibration batches for 3 processes" in proc.stderr
    assert "rank" not in proc.stderr  # no rank was started, so none failed
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m", "qvlquant",
           "quantize", "--method", "rtn", *ARGS, "--num-samples", "2", "--output", str(tmp_path / "q")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", QVLQUANT_QUIET="1"))
    assert proc.returncode != 0 and "2 calibration batches for 3 processes" in proc.stderr
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.partial").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (nccl between them)")
def test_two_gpus_write_the_single_gpu_export(tmp_path):
    quantize(tmp_path / "one", "gptq", "--device", "cuda")
    quantize(tmp_path / "two", "gptq", "--device", "cuda", nproc=2)
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()
