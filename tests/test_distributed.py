"""Training on more than one process (finetune/train/launch.py). Unit tests check how the processes are
counted and refused; docker-marked tests run real train containers on CPU (gloo): 2 processes in one
container train the same bytes as 1 process accumulating 2 micro-batches, two containers on a Docker
network of their own ("nodes" with separate storage, c10d rendezvous) train the same bytes again, and a
killed rank stops the run with its name, publishes nothing, and the next `invoke train` resumes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import uuid

import pytest
from support import ROOT, invoke, output, run_dir, sets

from finetune.core import layout, machine
from finetune.core.config import ConfigError, load_config
from finetune.host import cache, containers
from finetune.train import launch, sft

# A short run of the toy: the tiny base is built once per cache volume; 24 steps of batch 2 on CPU.
SHORT = ("train.max_steps=24", "train.logging_steps=4", "train.save_steps=8", "train.eval_steps=24")
ONE = ("train.distributed.processes=1", "train.grad_accum=2", "train.cpu_threads=1")
TWO = ("train.distributed.processes=2", "train.grad_accum=1", "train.cpu_threads=2")  # 1 thread per process


def distributed(**values):
    return load_config(ROOT / "configs/tiny-ja.yaml", [f"train.distributed.{k}={v}" for k, v in values.items()]
                       ).train.distributed


def test_auto_is_one_process_per_gpu_and_ddp_when_there_are_several(monkeypatch):
    monkeypatch.delenv(layout.NODE_RANK_ENV, raising=False)
    monkeypatch.delenv(layout.RENDEZVOUS_ENV, raising=False)
    monkeypatch.setattr(machine, "cuda_devices", lambda: 4)
    w = launch.world(distributed(processes="auto"))
    assert (w.processes, w.size, w.strategy, w.rendezvous) == (4, 4, "ddp", launch.LOCAL_RENDEZVOUS)
    monkeypatch.setattr(machine, "cuda_devices", lambda: 0)
    w = launch.world(distributed(processes="auto"))
    assert (w.processes, w.strategy, w.describe()) == (1, "none", "1 process")


def test_ranks_follow_the_node_rank_given(monkeypatch):
    monkeypatch.setenv(layout.NODE_RANK_ENV, "1")
    monkeypatch.setenv(layout.RENDEZVOUS_ENV, "node0:29400")
    monkeypatch.setenv("LOCAL_RANK", "1")
    w = launch.world(distributed(processes=2, nodes=2))
    assert (w.rank, w.size, w.describe()) == (3, 4, "2 nodes x 2 processes (ddp, world size 4)")


def test_a_node_rank_or_rendezvous_that_does_not_fit_is_refused(monkeypatch):
    monkeypatch.delenv(layout.RENDEZVOUS_ENV, raising=False)
    monkeypatch.setenv(layout.NODE_RANK_ENV, "0")
    with pytest.raises(launch.LaunchError, match="needs the rendezvous address: give --rendezvous HOST:PORT"):
        launch.world(distributed(nodes=2))
    monkeypatch.setenv(layout.NODE_RANK_ENV, "2")
    monkeypatch.setenv(layout.RENDEZVOUS_ENV, "node0:29400")
    with pytest.raises(launch.LaunchError, match=r"node rank 2 is outside 0..1"):
        launch.world(distributed(nodes=2))


def test_unknown_strategies_and_bad_counts_are_config_errors():
    with pytest.raises(ConfigError) as e:
        distributed(strategy="zero1", processes=0)
    text = str(e.value)
    assert "train.distributed.strategy" in text and "use one of: auto, ddp, zero2, zero3, fsdp2" in text
    assert "train.distributed.processes" in text and "must be auto or a whole number from 1 to 64" in text


def test_one_process_shares_nothing_whatever_the_strategy(monkeypatch):
    monkeypatch.delenv(layout.NODE_RANK_ENV, raising=False)
    w = launch.world(distributed(processes=1, strategy="zero3"))
    assert (w.size, w.strategy) == (1, "none") and sft.strategy_kwargs(w, "cpu") == {}
    assert launch.world(distributed(processes=2, strategy="zero3")).strategy == "zero3"


def test_fsdp2_on_cpu_processes_is_refused_rather_than_trained_as_ddp(monkeypatch):
    monkeypatch.delenv(layout.NODE_RANK_ENV, raising=False)
    w = launch.world(distributed(processes=2, strategy="fsdp2"))
    with pytest.raises(sft.TrainError, match="fsdp2 needs CUDA GPUs: .* on CPU use zero3"):
        sft.check_strategy(w, "cpu")


def test_deepspeed_configs_take_batch_accumulation_clipping_and_precision_from_the_run():
    for stage in (2, 3):
        ds = json.loads((sft.DEEPSPEED_CONFIGS / f"zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage and "optimizer" not in ds  # the Trainer's AdamW
        assert {ds[k] for k in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                                "gradient_clipping")} == {"auto"}
        assert ds["bf16"] == ds["fp16"] == {"enabled": "auto"}
    # ZeRO-3 hands the whole adapter to rank 0 for saving only when told to gather the weights
    assert json.loads((sft.DEEPSPEED_CONFIGS / "zero3.json").read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"] is True


def test_visible_gpus_are_counted_without_torch(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert machine.cuda_devices() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert machine.cuda_devices() == 0


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def losses(run: str) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run_dir(run) / "train" / layout.METRICS).read_text().splitlines()]
    return [(m["step"], m["loss"]) for m in lines if "loss" in m]


@pytest.fixture
def runs(request):
    """Fresh run names for a test, removed afterwards."""
    base = f"test-{request.node.name.replace('_', '-')[:30]}"
    names = [f"{base}-{i}" for i in range(3)]
    for name in names:
        subprocess.run(["rm", "-rf", str(run_dir(name))], check=True)
    yield names
    for name in names:
        subprocess.run(["rm", "-rf", str(run_dir(name))], check=True)


@pytest.fixture(scope="module")
def two():
    """The DDP run that the other strategies are held to: 2 processes, SHORT; its name, and its output."""
    name = "test-distributed-ddp2"
    subprocess.run(["rm", "-rf", str(run_dir(name))], check=True)
    done = invoke("train", *sets(name, *SHORT, *TWO))
    yield name, done
    subprocess.run(["rm", "-rf", str(run_dir(name))], check=True)


@pytest.mark.docker
@pytest.mark.slow
def test_two_processes_train_the_bytes_of_one_process_accumulating_two_and_two_nodes_the_same(runs, two, tmp_path):
    (one, _, nodes), (two, done) = runs, two
    assert done.returncode == 0, output(done)
    assert "train: launching 2 processes (ddp, world size 2) on node 0 (rendezvous 127.0.0.1:29400)" in done.stdout
    assert "effective batch 2 = 1 per device x 2 processes x 1 accumulated" in done.stdout
    assert done.stdout.count("train: done ->") == 1  # rank 1 publishes nothing and says nothing of the kind
    done = invoke("train", *sets(one, *SHORT, *ONE))
    assert done.returncode == 0, output(done)
    summary = json.loads((run_dir(two) / "train" / layout.SUMMARY).read_text())
    assert summary["distributed"] == {"strategy": "ddp", "nodes": 1, "processes_per_node": 2, "world_size": 2,
                                      "batch": {"per_device": 1, "processes": 2, "grad_accum": 1, "effective": 2},
                                      "weights_held_by_rank_0": 1.0}
    assert summary["numerics"]["threads"] == 1 and summary["steps"] == 24
    record = json.loads((run_dir(two) / "manifest.json").read_text())["stages"]["train"]
    assert record["distributed"] == summary["distributed"]
    # DDP sums the two ranks' gradients where accumulation adds them: the same floats, the same bytes.
    merged = "train/merged/model.safetensors"
    assert sha256(run_dir(two) / merged) == sha256(run_dir(one) / merged)
    # The logged loss is the mean of the ranks' losses there and a sum of micro-batch losses here: it agrees
    # to about 1e-7 (measured: 9.366176605 vs 9.366175652 at step 8), while the weights are equal.
    assert [s for s, _ in losses(two)] == [s for s, _ in losses(one)] == [4, 8, 12, 16, 20, 24]
    assert [x for _, x in losses(two)] == pytest.approx([x for _, x in losses(one)], rel=1e-6)

    # Two "machines": two containers with their own artifacts on a Docker network that only they are on.
    network = containers.client().networks.create(f"finetune-test-{uuid.uuid4().hex[:8]}", internal=True)
    node0, node1 = nodes, f"{nodes}-node1"
    try:
        endpoint = f"{layout.container_name('train', node0)}:29400"
        flags = ("--rendezvous", endpoint, "--network", network.name)
        multi = (*SHORT, "train.distributed.processes=1", "train.distributed.nodes=2", "train.grad_accum=1",
                 "train.cpu_threads=1")
        logs, procs = {}, {}
        for rank, run in ((1, node1), (0, node0)):  # node 1 first: it waits for node 0 at the rendezvous
            logs[rank] = tmp_path / f"node{rank}.log"
            with logs[rank].open("w") as sink:
                procs[rank] = subprocess.Popen([str(ROOT / "invoke"), "train", *sets(run, *multi), "--node-rank",
                                                str(rank), *flags], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in procs.values()):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs.values()):
                for p in procs.values():
                    p.terminate()  # invoke removes its container on SIGTERM
                break
            time.sleep(0.5)
        for p in procs.values():
            p.wait(timeout=60)
    finally:
        network.remove()
    text = {rank: log.read_text() for rank, log in logs.items()}
    assert [procs[0].returncode, procs[1].returncode] == [0, 0], text[0][-3000:] + text[1][-3000:]
    assert "train: node 1 done; node 0 holds the trained model" in text[1]
    assert sha256(run_dir(node0) / merged) == sha256(run_dir(two) / merged)
    assert losses(node0) == losses(two)  # the same ranks' losses, averaged the same way
    assert not list(run_dir(node1).iterdir()), "node 1 keeps nothing: no train/, no stamp, no partial work"
    subprocess.run(["rm", "-rf", str(run_dir(node1))], check=True)


def worker_pid(container, local_rank: int) -> int:
    """The pid (in the container) of the training worker with this local rank."""
    code = ("import os\n"
            "for p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try: env = open(f'/proc/{p}/environ', 'rb').read().split(b'\\0')\n"
            "    except OSError: continue\n"
            f"    if b'LOCAL_RANK={local_rank}' in env and b'TORCHELASTIC_RUN_ID=finetune-' in b' '.join(env): print(p)")
    found = container.exec_run(["python", "-c", code], user=containers.container_user()).output.decode().split()
    assert len(found) == 1, found
    return int(found[0])


@pytest.mark.docker
@pytest.mark.slow
def test_a_killed_rank_stops_the_run_with_its_name_and_the_next_run_resumes(runs, tmp_path):
    run = runs[0]
    overrides = ("train.max_steps=60", "train.save_steps=10", "train.logging_steps=10", *TWO)
    checkpoints = run_dir(run) / ".train.partial" / "checkpoints"
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        first = subprocess.Popen([str(ROOT / "invoke"), "train", *sets(run, *overrides)], cwd=ROOT,
                                 stdout=sink, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
            assert time.monotonic() < deadline and first.poll() is None, "no checkpoint: " + log.read_text()[-2000:]
            time.sleep(0.2)
        container = containers.client().containers.get(layout.container_name("train", run))
        pid = worker_pid(container, 1)
        container.exec_run(["python", "-c", f"import os; os.kill({pid}, 9)"], user=containers.container_user())
        first.wait(timeout=120)
    text = log.read_text()
    assert first.returncode != 0, text[-2000:]
    assert f"train: rank 1 (node 0, local rank 1, pid {pid}) was killed by SIGKILL" in text, text[-3000:]
    assert "rerun `invoke train` to resume from the last checkpoint" in text
    assert not (run_dir(run) / "train").exists() and cache.read_stamp(run_dir(run), "train") is None
    saved = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))

    second = invoke("train", *sets(run, *overrides))
    assert second.returncode == 0, output(second)
    assert f"train: resuming from checkpoint-{saved}" in second.stdout
    summary = json.loads((run_dir(run) / "train" / layout.SUMMARY).read_text())
    assert summary["resumed_from"] == f"checkpoint-{saved}" and summary["steps"] == 60
    assert [step for step, _ in losses(run)] == list(range(10, 61, 10))


def adapter(run: str) -> dict:
    """The run's LoRA adapter: name -> float64 array (a safetensors file of F32 tensors, read directly)."""
    import numpy as np

    raw = (run_dir(run) / "train" / layout.ADAPTER / "adapter_model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = {k: v for k, v in json.loads(raw[8:8 + size]).items() if k != "__metadata__"}
    assert {v["dtype"] for v in header.values()} == {"F32"}
    return {k: np.frombuffer(raw[8 + size + v["data_offsets"][0]:8 + size + v["data_offsets"][1]], "<f4")
            .astype(np.float64) for k, v in header.items()}


@pytest.mark.docker
@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_train_what_ddp_trains_and_zero3_holds_half_the_weights(runs, two):
    """ZeRO shards what DDP replicates; the sums it does are the same ones in other groupings (bucketed
    reduce-scatters), so the weights agree with DDP's to float rounding, not to the bit."""
    two, _ = two
    ddp, ddp_summary = adapter(two), json.loads((run_dir(two) / "train" / layout.SUMMARY).read_text())
    for run, strategy in zip(runs, ("zero2", "zero3")):
        done = invoke("train", *sets(run, *SHORT, *TWO, f"train.distributed.strategy={strategy}"))
        assert done.returncode == 0, output(done)
        assert f"train: launching 2 processes ({strategy}, world size 2)" in done.stdout
        assert "built successfully" not in done.stdout + done.stderr  # no op compiled: gloo's allreduce
        summary = json.loads((run_dir(run) / "train" / layout.SUMMARY).read_text())
        assert summary["distributed"]["strategy"] == strategy and summary["steps"] == 24
        assert summary["parameters"] == ddp_summary["parameters"]
        held = summary["distributed"]["weights_held_by_rank_0"]
        if strategy == "zero2":  # the weights whole in every process; optimizer state and gradients sharded
            assert held == 1.0
        else:  # every weight split between the two processes, the trained copies and the adapter too
            assert held == pytest.approx(0.5, abs=0.01), held
        # measured: zero2 within 1e-5 of DDP, zero3 within 5e-5 (10 steps); losses equal to 6 digits
        got = adapter(run)
        assert got.keys() == ddp.keys()
        worst = max(float(abs(got[k] - ddp[k]).max()) for k in ddp)
        assert 0 < worst < 1e-3, worst  # it trained (the LoRA B matrices moved) as DDP did
        assert [x for _, x in losses(run)] == pytest.approx([x for _, x in losses(two)], rel=1e-5)
        assert summary["eval_loss"] == pytest.approx(ddp_summary["eval_loss"], rel=1e-5)
    # The adapter ZeRO-3 gathered for rank 0 merges and converts like any other.
    done = invoke("convert", *sets(runs[1], *SHORT, *TWO, "train.distributed.strategy=zero3",
                                   "convert.require_stop=false"))
    assert done.returncode == 0, output(done)


@pytest.mark.docker
def test_fsdp2_on_cpu_stops_before_training_with_what_to_use_instead(runs):
    done = invoke("train", *sets(runs[0], *SHORT, *TWO, "train.distributed.strategy=fsdp2"))
    assert done.returncode != 0
    assert "train.distributed.strategy=fsdp2 needs CUDA GPUs" in output(done) and "on CPU use zero3" in output(done)
    assert not (run_dir(runs[0]) / "train").exists() and cache.read_stamp(run_dir(runs[0]), "train") is None
