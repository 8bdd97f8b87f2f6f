"""invoke tasks: check the data, build the stage images, run the stages. Orchestration only: the stage
code lives in the `finetune` package and runs inside the images.

    ./invoke --list                  # what there is
    ./invoke data                    # validate the dataset of the default config
    ./invoke images.base             # a local Debian base image, for machines without a registry
    ./invoke images.base --suite trixie   # ... the convert image's (Debian's CPU torch); built when needed
    ./invoke train                   # fine-tune in the train image -> artifacts/<run>/train/
    ./invoke convert                 # GGUF + quants with the pinned llama.cpp -> artifacts/<run>/convert/
    ./invoke serve                   # Ollama serving the run's model (and its baseline), detached
    ./invoke chat "商品を返品したいです"  # one answer from the served model, streamed
    ./invoke stop                    # stop the run's Ollama container
    ./invoke export                  # the served model as a bundle for any Ollama -> artifacts/<run>/export/
    ./invoke eval                    # baseline vs fine-tuned (every quant) on the eval split: report.html
    ./invoke bench                   # every stage timed beside the plain tools: bench.md, bench.json
    ./invoke bench --set "bench.models=[0.5b]"   # ... and generation on a 494M random-init model
    ./invoke verify                  # recheck every artifact against artifacts/<run>/manifest.json
    ./invoke verify --golden         # ... and against the published hashes (golden/): same bytes everywhere
    ./invoke families                # each chat-template family trained, converted, served and compared
    ./invoke images.ollama           # Ollama built from pinned source, for machines without a registry
    ./invoke images.ollama --release 0.34.3   # the newest Ollama, to try a bundle on (tests/test_serve.py)
    ./invoke test                    # the test suite, as CI runs it

Defaults live in one place (`ns.configure` below) and can be changed in invoke.yaml or with environment
variables, e.g. INVOKE_FINETUNE_CONFIG=configs/qwen2.5-3b-ja-qlora.yaml, INVOKE_FINETUNE_LOCAL_BASE=1.
INVOKE_FINETUNE_RUNNER=native runs the stages in the host's Python instead of their images (Colab, a Mac, a
cluster without Docker: finetune/host/native.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from invoke import Collection, Context, Exit, task

from finetune import bench as bench_
from finetune.core import data as data_stage
from finetune.core import layout, machine
from finetune.core.config import ConfigError, RunConfig, load_config, to_yaml
from finetune.core.families import CASES, PROMPT_CASES
from finetune.evaluation import evaluate
from finetune.evaluation import families as families_
from finetune.host import baseimage, cache, containers, manifest, native
from finetune.serve import bundle, modelfiles
from finetune.serve import server as serve_stage

CONFIG_HELP = "run config (YAML); default: finetune.config (configs/tiny-ja.yaml)"
SET_HELP = "override one key, e.g. --set train.max_steps=20 (repeatable)"


@task(iterable=["set_"], help={"config": CONFIG_HELP, "set_": SET_HELP,
                               "tokenizer": "tokenizer.json to report lengths in tokens and check max_seq_len"})
def data(c: Context, config: str | None = None, set_: list[str] | None = None, tokenizer: str | None = None) -> None:
    """Validate the config's dataset and print its stats; every bad line is reported, nothing is written."""
    argv = ["--config", config or c.finetune.config, *(f"--set={s}" for s in set_ or [])]
    argv += ["--tokenizer", tokenizer] if tokenizer else []
    if (code := data_stage.main(argv)) != 0:
        raise Exit(code=code)


FORCE_HELP = "redo the stage even if it is up to date"


@task(iterable=["set_"], help={
    "config": CONFIG_HELP, "set_": SET_HELP, "force": FORCE_HELP,
    "node_rank": "this machine's rank when train.distributed.nodes > 1 (0: the machine that keeps the model)",
    "rendezvous": "HOST:PORT on node 0 that every node reaches, when train.distributed.nodes > 1",
    "network": "Docker network of the train container (default with several nodes: host)"})
def train(c: Context, config: str | None = None, set_: list[str] | None = None, force: bool = False,
          node_rank: int = 0, rendezvous: str | None = None, network: str | None = None) -> None:
    """Fine-tune the config's base model (LoRA/QLoRA) in the train image; writes artifacts/<run>/train/.
    With train.distributed: several processes (every GPU by default), on one machine or several."""
    cfg = load(c, config, set_)
    gpus = machine.cuda_devices() > 0 if is_native(c) else containers.has_gpu()
    if cfg.train.distributed.processes == "auto":  # resolved here, so that the stage's key has the number
        processes = max(machine.cuda_devices(), 1) if gpus else 1
        cfg = load(c, config, [*(set_ or []), f"train.distributed.processes={processes}"])
    nodes = cfg.train.distributed.nodes
    if nodes > 1 and not rendezvous:
        raise Exit(f"train: train.distributed.nodes={nodes} needs --rendezvous HOST:PORT, node 0's address and a "
                   "free port that every node reaches (the same on every node), and --node-rank on each", code=2)
    if not 0 <= node_rank < nodes:
        raise Exit(f"train: --node-rank {node_rank} is outside 0..{nodes - 1} (train.distributed.nodes={nodes})", code=2)
    image = stage_image(c, "train")

    def work(run_dir: Path) -> None:
        where = f"{cfg.train.distributed.processes} process(es) per node x {nodes} nodes, node {node_rank}"
        on = ("natively (the host's Python), on " + ("CUDA" if gpus else "the best device torch finds: MPS or CPU")
              if is_native(c) else f"{image} on " + ("GPU (--gpus all)" if gpus else "CPU (no NVIDIA runtime found)"))
        print(f"train: {cfg.run}: running {on}" + (f"; {where}" if nodes > 1 else ""))
        env = {"HF_HUB_OFFLINE": "1"} if layout.is_builtin(cfg.model.id) else {}
        if os.environ.get("HF_TOKEN"):
            env["HF_TOKEN"] = os.environ["HF_TOKEN"]  # at run time only: never in a layer, a log or an artifact
        if nodes > 1:
            env |= {layout.NODE_RANK_ENV: str(node_rank), layout.RENDEZVOUS_ENV: rendezvous}
            env |= {k: os.environ[k] for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k in os.environ}
        name = "train" if node_rank == 0 else f"train-node{node_rank}"
        if is_native(c):
            code = run_native_stage(c, "train", cfg, run_dir, env)
        else:
            code = run_stage(image, cfg, [containers.Mount(run_dir, layout.CONTAINER_RUN_DIR, read_only=False)],
                             name=name, env=env, gpus=gpus,
                             named_volumes={layout.HF_CACHE_VOLUME: layout.HF_CACHE_MOUNT},
                             network=network or ("host" if nodes > 1 else None))
        if code == 2:  # the stage's own error (stage_main), printed above with what to do
            raise Exit("train: the train stage stopped with the error above; fix that and rerun `invoke train` "
                       "(a checkpoint, if any, is kept)", code=code)
        if code != 0:
            raise Exit(f"train: the train {'process' if is_native(c) else 'container'} exited with {code}; rerun "
                       "`invoke train` to resume from the last checkpoint", code=code)

    if node_rank > 0:  # rank 0's machine keeps the model; this one records nothing a later stage could read
        work(layout.run_dir(cfg.run))
        print(f"train: node {node_rank} done; node 0 holds the trained model")
        return
    cached_stage(c, cfg, "train", image, work, force)


@task(iterable=["set_"], help={"config": CONFIG_HELP, "set_": SET_HELP, "force": FORCE_HELP})
def convert(c: Context, config: str | None = None, set_: list[str] | None = None, force: bool = False) -> None:
    """Convert the merged model to GGUF and quantize it (pinned llama.cpp); writes artifacts/<run>/convert/.

    Every GGUF is checked (loads, metadata, tokens, a greedy answer that stops) and listed in report.json.
    """
    cfg = load(c, config, set_)
    image = stage_image(c, "convert")

    def work(run_dir: Path) -> None:
        train_dir = layout.stage_dir(run_dir, "train")
        merged = sum(p.stat().st_size for p in (train_dir / layout.MERGED).glob("*.safetensors"))
        copies = 1 + cfg.serve.baseline + 0.6 * (len(cfg.convert.quant_types) + cfg.serve.baseline)
        cache.check_space(run_dir, int(merged * copies), "convert")
        layout.BASE_GGUF_CACHE.mkdir(parents=True, exist_ok=True)
        if is_native(c):
            if (code := run_native_stage(c, "convert", cfg, run_dir)) != 0:
                raise Exit(f"convert: the convert process exited with {code}", code=code)
            return
        mounts = [containers.Mount(run_dir, layout.CONTAINER_RUN_DIR, read_only=False),
                  containers.Mount(layout.BASE_GGUF_CACHE.resolve(), layout.BASE_GGUF_CACHE_MOUNT, read_only=False)]
        if train_dir.is_dir():  # else the stage reports the missing model (docker would create the dir)
            mounts.append(containers.Mount(train_dir, f"{layout.CONTAINER_RUN_DIR}/train"))
        code = run_stage(image, cfg, mounts, name="convert")
        if code != 0:
            raise Exit(f"convert: the convert container exited with {code}", code=code)

    cached_stage(c, cfg, "convert", image, work, force)


@task(iterable=["set_"], help={"config": CONFIG_HELP, "set_": SET_HELP, "force": FORCE_HELP})
def serve(c: Context, config: str | None = None, set_: list[str] | None = None, force: bool = False) -> None:
    """Serve the converted model with Ollama, detached: writes artifacts/<run>/serve/ (Modelfiles) and starts
    the serve container; prints the URL and the model names once they answer. Running it again replaces it."""
    cfg = load(c, config, set_)
    run_dir = layout.run_dir(cfg.run)
    try:
        modelfiles.check_inputs(cfg, run_dir)  # before building anything
    except modelfiles.ServeError as e:
        raise Exit(f"serve: {e}", code=2) from e
    image = stage_image(c, "serve")

    def work(run_dir: Path) -> None:
        try:
            print(f"serve: Modelfiles in {modelfiles.write_modelfiles(cfg, run_dir)}")
        except modelfiles.ServeError as e:
            raise Exit(f"serve: {e}", code=2) from e

    key = cached_stage(c, cfg, "serve", image, work, force)
    if is_native(c) and (ollama_binary := native.ollama_binary(c.finetune.ollama)) is None:
        export(c, config, set_)
        print(f"serve: no `{c.finetune.ollama}` binary on PATH, so nothing is served: the bundle above runs on any "
              "Ollama. To serve here, install Ollama (https://ollama.com/download; Linux: `curl -fsSL "
              "https://ollama.com/install.sh | sh`) or name its binary (INVOKE_FINETUNE_OLLAMA=/path/to/ollama), "
              "then run `invoke serve` again")
        return
    try:
        if is_native(c):
            served = serve_stage.ensure_running_native(cfg, run_dir, ollama_binary, key)
        else:
            served = serve_stage.ensure_running(cfg, run_dir, image, key)
    except (modelfiles.ServeError, native.NativeError) as e:
        raise Exit(f"serve: {e}", code=2) from e
    print(f"serve: Ollama {served.version} at {served.url} ({'' if is_native(c) else 'container '}{served.container}); "
          f"models: {', '.join(served.models)}")
    print('serve: try `./invoke chat "商品を返品したいです"`; stop with `./invoke stop`')


def cached_stage(c: Context, cfg: RunConfig, stage: str, image: str, work, force: bool) -> str:
    """Run `work(run_dir)` unless the stage is up to date; then stamp it and record it in the manifest.
    Prints one line saying which and why; returns the stage's key. Outputs of the stage before it that
    have no stamp (an interrupted or killed run) are refused."""
    run_dir = layout.run_dir(cfg.run)
    try:
        with cache.run_lock(run_dir):
            image_attrs = stage_attrs(c, stage, image)
            inputs = cache.stage_inputs(stage, cfg, run_dir, image_attrs["Id"])
            reason = "--force" if force or c.finetune.force else cache.why_rerun(run_dir, inputs)
            if reason is None:
                print(f"{stage}: up to date (key {inputs.key[:12]})")
                return inputs.key
            print(f"{stage}: rerun, because {reason}")
            before = cache.STAGES[stage].upstream
            unstamped = before is not None and cache.read_stamp(run_dir, before) is None
            if unstamped and layout.stage_dir(run_dir, before).is_dir():
                raise Exit(f"{stage}: {run_dir}/{before}/ is not complete (no stamp): run `invoke {before}` first",
                           code=2)
            cache.clear_stamp(run_dir, stage)
            started = time.time()
            work(run_dir)
            record = manifest.stage_record(stage, image_attrs, started, time.time(), run_dir)
            cache.write_stamp(run_dir, inputs, record)
            manifest.record_stage(run_dir, inputs, record, to_yaml(cfg))
            return inputs.key
    except cache.CacheError as e:
        raise Exit(f"{stage}: {e}", code=2) from e


@task(iterable=["set_"], help={"config": CONFIG_HELP, "set_": SET_HELP})
def eval(c: Context, config: str | None = None, set_: list[str] | None = None) -> None:  # noqa: A001
    """Ask the served baseline and fine-tuned models (every quant) the eval questions and measure them;
    writes artifacts/<run>/eval/ (results.json, report.md, report.html). Exits 1 if an eval.gate fails."""
    cfg = load(c, config, set_)
    run_dir = layout.run_dir(cfg.run)
    try:
        results = evaluate.evaluate(cfg, run_dir)
    except evaluate.EvalError as e:
        raise Exit(f"eval: {e}", code=2) from e
    print((run_dir / "eval" / "report.md").read_text(encoding="utf-8").split("\n| question |")[0])
    print(f"eval: report at {run_dir / 'eval' / 'report.html'}")
    if failures := results["gate"]["failures"]:
        raise Exit("eval: gate failed: " + "; ".join(failures), code=1)


@task(iterable=["set_"], help={"config": CONFIG_HELP, "set_": SET_HELP,
                               "out": "where bench.json, bench.md and the logs go "
                                      "(default: artifacts/<run>-bench-results)"})
def bench(c: Context, config: str | None = None, set_: list[str] | None = None, out: str | None = None) -> None:
    """Measure every stage beside the plain tool it replaces (TRL script, llama.cpp by hand, llama-bench,
    plain Ollama), the pipeline cold and warm, and the image sizes; on a separate run, <run>-bench."""
    if is_native(c):
        raise Exit("bench: works with the stage images only (finetune.runner=docker)", code=2)
    cfg = load(c, config, set_)
    images = [stage_image(c, stage) for stage in ("train", "convert", "serve")]  # built before timing anything
    images += [c.finetune.ollama_image, c.finetune.base_image] if local_base_reason(c, "serve") else []
    images += [base_tag(c, base_suite("Dockerfile.convert"))] if local_base_reason(c, "convert") else []
    try:
        results = bench_.run(cfg, config or c.finetune.config, set_ or [], Path(out) if out else None, images)
    except (bench_.BenchError, modelfiles.ServeError) as e:
        raise Exit(f"bench: {e}", code=1) from e
    print(bench_.markdown(results))


@task(iterable=["set_"], help={"config": CONFIG_HELP, "set_": SET_HELP,
                               "golden": "also compare with the published hashes (golden/<config>.json): the same "
                                         "bytes as on every other x86-64 machine with AVX2",
                               "update": "with --golden: publish this run's hashes instead (for a change meant to "
                                         "change the artifacts; commit them with it)",
                               "other_machine": "with --update: add this machine's hashes as another CPU class's, "
                                                "beside the reference machine's (README: Reproducibility)"})
def verify(c: Context, config: str | None = None, set_: list[str] | None = None, golden: bool = False,
           update: bool = False, other_machine: bool = False) -> None:
    """Recheck every artifact of the run against artifacts/<run>/manifest.json (size and sha256); with --golden,
    against the published hashes too, naming the first artifact that differs."""
    cfg = load(c, config, set_)
    run_dir = layout.run_dir(cfg.run)
    checked, problems = manifest.verify(run_dir)
    for p in problems:
        print(f"verify: {p}", file=sys.stderr)
    if problems:
        raise Exit(f"verify: {len(problems)} of {checked} files do not match the manifest", code=1)
    print(f"verify: all {checked} files of {run_dir} match the manifest")
    if not golden:
        return
    config_path = config or c.finetune.config
    path = manifest.golden_path(config_path)
    if update:
        numerics = json.loads((layout.stage_dir(run_dir, "train") / layout.SUMMARY).read_text(encoding="utf-8")).get(
            "numerics")
        if other_machine:
            record = manifest.add_other_machine(path, run_dir, numerics)
            print(f"verify: recorded the hashes of {len(record['files'])} files as {record['made_on']['cpu']}'s "
                  f"in {path}")
            return
        published = manifest.write_golden(path, config_path, cfg.model_dump(mode="json"), run_dir, numerics)
        print(f"verify: published the hashes of {len(published['files'])} files to {path} (other machines' records "
              "dropped: make them again with --update --other-machine on such a machine)")
        return
    if not path.is_file():
        raise Exit(f"verify: no published hashes for {config_path} ({path}); they exist for "
                   f"{', '.join(sorted(str(p) for p in manifest.GOLDEN_DIR.glob('*.json')))}", code=2)
    published = json.loads(path.read_text(encoding="utf-8"))
    if (why := manifest.config_difference(published, cfg.model_dump(mode="json"))) is not None:
        raise Exit(f"verify: {why}", code=2)
    if (problems := manifest.compare_golden(published, run_dir)) and (other := manifest.matching_machine(
            published, run_dir)) is not None:
        print(f"verify: all {len(other['files'])} hashes match those published for {other['made_on']['cpu']} "
              f"({path}, other_machines), not the reference machine's ({published['made_on']['cpu']}): a known "
              "difference between these CPU classes (README: Reproducibility)")
        return
    if problems:
        for p in problems:
            print(f"verify: {p}", file=sys.stderr)
        raise Exit(f"verify: {len(problems)} of {len(published['files'])} artifacts differ from the published hashes "
                   f"({path}); the first that differs: {problems[0]}", code=1)
    print(f"verify: all {len(published['files'])} published hashes match ({path}): the same bytes as on every "
          "x86-64 machine with AVX2")


@task(iterable=["set_"], help={"config": CONFIG_HELP, "set_": SET_HELP, "question": "what to ask",
                               "baseline": "ask <model_name>-baseline (base model + prompt) instead"})
def chat(c: Context, question: str, config: str | None = None, set_: list[str] | None = None,
         baseline: bool = False) -> None:
    """Ask the served model one question (ollama client) and stream its answer."""
    cfg = load(c, config, set_)
    try:
        serve_stage.chat(cfg, question, baseline=baseline)
    except modelfiles.ServeError as e:
        raise Exit(f"chat: {e}", code=1) from e


@task(iterable=["set_"], help={"config": CONFIG_HELP, "set_": SET_HELP})
def export(c: Context, config: str | None = None, set_: list[str] | None = None) -> None:
    """Write the served model as a bundle for any Ollama: artifacts/<run>/export/<model name>/ and .tar, with the
    GGUF, a Modelfile beside it, the run's record and the two commands (finetune/serve/bundle.py)."""
    cfg = load(c, config, set_)
    try:
        archive = bundle.export(cfg, layout.run_dir(cfg.run))
    except modelfiles.ServeError as e:
        raise Exit(f"export: {e}", code=2) from e
    folder = archive.with_suffix("")
    print(f"export: {folder}/ and {archive.name} ({archive.stat().st_size / 1e6:.1f} MB, sha256 "
          f"{archive.with_name(archive.name + '.sha256').read_text().split()[0][:16]}); on any machine with Ollama: "
          f"`cd {folder.name} && ollama create {cfg.serve.model_name} -f Modelfile`")


@task(iterable=["set_"], help={"config": CONFIG_HELP, "set_": SET_HELP})
def stop(c: Context, config: str | None = None, set_: list[str] | None = None) -> None:
    """Stop and remove the run's serve container (the model store volume stays)."""
    cfg = load(c, config, set_)
    if is_native(c):
        print(f"stop: the native Ollama of {cfg.run} {'stopped' if native.stop(cfg) else 'was not running'}")
        return
    name = serve_stage.container_name(cfg)
    print(f"stop: {name} {'removed' if serve_stage.stop(cfg) else 'was not running'}")


@contextlib.contextmanager
def resolved_config(cfg: RunConfig) -> Iterator[Path]:
    """The resolved config as a temporary YAML file, readable by a container's non-root user."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", encoding="utf-8") as resolved:
        resolved.write(to_yaml(cfg))
        resolved.flush()
        os.chmod(resolved.name, 0o644)
        yield Path(resolved.name)


def run_stage(image: str, cfg: RunConfig, mounts: list[containers.Mount], name: str, **kwargs) -> int:
    """Run a stage image on the resolved config (mounted at /work/run.yaml) and the config's data files."""
    with resolved_config(cfg) as resolved:
        mounts = [containers.Mount(resolved, layout.CONTAINER_CONFIG), *containers.data_mounts(cfg), *mounts]
        try:
            return containers.run(image, ["--config", layout.CONTAINER_CONFIG, "--out", layout.CONTAINER_RUN_DIR], mounts,
                                  name=layout.container_name(name, cfg.run), **kwargs)
        except containers.ContainerError as e:
            raise Exit(f"{name}: {e}", code=1) from e


NATIVE = "native"  # the "image" of a stage that the native runner runs
RUNNERS = ("docker", NATIVE)
_native: list[native.Environment] = []  # built or found once per invoke


def is_native(c: Context) -> bool:
    """Whether finetune.runner (INVOKE_FINETUNE_RUNNER) is native: the stages in the host's Python."""
    if c.finetune.runner not in RUNNERS:
        raise Exit(f"finetune.runner={c.finetune.runner!r}: use docker (the stage images) or native (the host's "
                   "Python: Colab, a Mac, a cluster without Docker), e.g. INVOKE_FINETUNE_RUNNER=native", code=2)
    return c.finetune.runner == NATIVE


def native_environment(c: Context) -> native.Environment:
    if not _native:
        try:
            _native.append(native.environment(c.finetune.native_python))
        except native.NativeError as e:
            raise Exit(f"native: {e}", code=2) from e
    return _native[0]


def stage_attrs(c: Context, stage: str, image: str) -> dict:
    """The stage image's attrs for its cache key and the manifest; for the native runner their equivalent:
    the environment and the stage's code (train, convert), the host's Ollama binary (serve)."""
    if image != NATIVE:
        return containers.client().images.get(image).attrs
    if stage == "serve":
        return native.ollama_attrs(native.ollama_binary(c.finetune.ollama))
    return native.image_attrs(native_environment(c), stage)


def run_native_stage(c: Context, stage: str, cfg: RunConfig, run_dir: Path, env: dict[str, str] | None = None) -> int:
    """Run a stage in the native environment on the resolved config."""
    with resolved_config(cfg) as resolved:
        return native.run_stage(native_environment(c), stage, resolved, run_dir, cfg, env)


def load(c: Context, config: str | None, overrides: list[str] | None) -> RunConfig:
    """The validated run config, or an Exit that lists every problem (or that the tasks of this command line
    would work on different runs)."""
    if Path(sys.argv[0]).name == "invoke" or Path(sys.argv[0]).parent.name == "invoke":
        check_one_run(sys.argv[1:])
    try:
        return load_config(config or c.finetune.config, overrides or [])
    except ConfigError as e:
        raise Exit(str(e), code=2) from e


# Tasks that work on the run their config names; `bench` works on a run of its own.
RUN_TASKS = ("data", "train", "convert", "serve", "chat", "stop", "eval", "verify")


def runs_asked(argv: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """{task: (its --config, its --set run=...)} as given on the command line, None where not given. invoke hands
    each task only the flags that follow it: `./invoke train convert serve --set run=x` gives run=x to serve
    alone."""
    found: dict[str, list[str | None]] = {}
    current = None
    tokens = iter(argv)
    for token in tokens:
        if token in ns.task_names:
            current = token
            found[current] = [None, None]
            continue
        flag, eq, value = token.partition("=")
        if current is None or flag not in ("--set", "-s", "--config", "-c"):
            continue
        value = value if eq else next(tokens, "")
        if flag in ("--config", "-c"):
            found[current][0] = value
        elif value.startswith("run="):
            found[current][1] = value.removeprefix("run=")
    return {task: (config, run) for task, (config, run) in found.items()}


def check_one_run(argv: list[str]) -> None:
    """Exit before any work when the tasks of one command line would work on different runs or configs."""
    asked = {task: given for task, given in runs_asked(argv).items() if task in RUN_TASKS}
    if len(set(asked.values())) <= 1:
        return
    unset = "(the config's)"
    shown = "; ".join(f"{task}: --config {config or '(default)'}, run {run or unset}"
                      for task, (config, run) in asked.items())
    raise Exit(f"these tasks would work on different runs ({shown}): invoke gives each task only the --config "
               "and --set that follow it. Repeat them after each task, e.g. "
               "`./invoke train --set run=x convert --set run=x serve --set run=x`", code=2)


def stage_image(c: Context, stage: str, context: str = ".", tag: str | None = None) -> str:
    """Build Dockerfile.<stage> as finetune-<stage>:latest (the layer cache makes an unchanged build fast),
    FROM the local base image (serve: the Ollama built from source) when `local_base_reason` gives one.
    (`context` and `tag`: a test builds a copy of the tree.) With the native runner: NATIVE, nothing built."""
    if is_native(c):
        native_environment(c)  # built on first use, before any stage work
        return NATIVE
    args = {}
    if (why := local_base_reason(c, stage)) is not None:
        suite = baseimage.SUITE if stage == "serve" else base_suite(str(Path(context) / f"Dockerfile.{stage}"))
        try:
            if stage == "serve":
                ollama(c)
                args["OLLAMA_IMAGE"] = c.finetune.ollama_image
            else:
                base(c, suite=suite)
                args["BASE_IMAGE"] = base_tag(c, suite)
        except Exit as e:
            command = "images.base" + ("" if suite == baseimage.SUITE else f" --suite {suite}")
            raise Exit(f"{stage}: {why}, and the local base cannot be built either: {e.message}\nFix one of them: "
                       "make the registry reachable for the Docker engine, or build the local base as root "
                       f"(`sudo ./invoke {command}`, which needs debootstrap)", code=e.code) from e
    tag = tag or layout.image_tag(stage)
    try:
        containers.build(str(Path(context) / f"Dockerfile.{stage}"), tag, args, context=context)
    except containers.ContainerError as e:
        raise Exit(f"{stage}: {e}") from e
    return tag


UPSTREAM_ARG = {"train": "BASE_IMAGE", "convert": "BASE_IMAGE", "serve": "OLLAMA_IMAGE"}
_cannot_pull: dict[str, str | None] = {}  # stage -> why its upstream image cannot be pulled: asked and said once
LOCAL_BASE_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def local_base_reason(c: Context, stage: str) -> str | None:
    """Why Dockerfile.<stage> builds FROM the local base instead of its pinned upstream image, or None:
    finetune.local_base when it is set (1/true or 0/false), else (auto) when the upstream image is neither
    here nor pullable, found out in seconds and said in one line."""
    setting = str(c.finetune.local_base).lower()
    if setting != "auto":
        if setting not in LOCAL_BASE_VALUES:
            raise Exit(f"finetune.local_base={c.finetune.local_base!r}: use auto, 1 (build FROM the local base) or "
                       "0 (pull the upstream base), e.g. INVOKE_FINETUNE_LOCAL_BASE=1", code=2)
        return "finetune.local_base is set" if LOCAL_BASE_VALUES[setting] else None
    if stage in _cannot_pull:
        return _cannot_pull[stage]
    try:
        upstream = containers.dockerfile_default(f"Dockerfile.{stage}", UPSTREAM_ARG[stage])
        why = containers.cannot_pull(upstream)
    except containers.ContainerError as e:
        raise Exit(f"{stage}: {e}", code=2) from e
    if why is None:
        _cannot_pull[stage] = None
        return None
    instead = "Ollama from source" if stage == "serve" else "FROM the local base"
    print(f"{stage}: cannot pull {upstream} ({why}); building {instead} instead "
          "(INVOKE_FINETUNE_LOCAL_BASE=1 or 0 forces either way)", file=sys.stderr, flush=True)
    _cannot_pull[stage] = f"cannot pull {upstream}"
    return _cannot_pull[stage]


def base_suite(dockerfile: str) -> str:
    """The Debian suite of a Dockerfile's local base: the one its upstream default names
    (`ARG BASE_IMAGE=debian:<suite>-slim`; convert: trixie, for Debian's CPU torch), else bookworm (train's
    upstream is a CUDA image; the local base stands in for it on CPU)."""
    try:
        upstream = containers.dockerfile_default(dockerfile, "BASE_IMAGE")
    except containers.ContainerError as e:
        raise Exit(f"images.base: {e}", code=2) from e
    if (found := re.fullmatch(r"debian:(\w+)(-slim)?", upstream)) is None:
        return baseimage.SUITE
    if found.group(1) not in baseimage.SUITES:
        raise Exit(f"images.base: {dockerfile} builds FROM {upstream}, and a local base builds for "
                   f"{', '.join(baseimage.SUITES)} only", code=2)
    return found.group(1)


def base_tag(c: Context, suite: str) -> str:
    """The local base image of `suite`: finetune.base_image for bookworm, finetune-base:<suite> otherwise."""
    return c.finetune.base_image if suite == baseimage.SUITE else layout.base_image(suite)


@task(help={"tag": "image tag (default: finetune.base_image for bookworm, finetune-base:<suite> otherwise)",
            "mirror": "Debian archive URL (default: the host's)", "force": "rebuild even if the image exists",
            "suite": f"Debian suite: {', '.join(baseimage.SUITES)} (default: {baseimage.SUITE})"})
def base(c: Context, tag: str | None = None, mirror: str | None = None, force: bool = False,
         suite: str = baseimage.SUITE) -> None:
    """Build a Debian base image from distro packages (debootstrap + docker import), as root: bookworm for the
    train and Ollama images, trixie for convert (the stage images build the one they need themselves)."""
    if suite not in baseimage.SUITES:
        raise Exit(f"images.base: no local base for Debian {suite!r}; these build: {', '.join(baseimage.SUITES)}",
                   code=2)
    tag = tag or base_tag(c, suite)
    try:
        if containers.image_exists(tag) and not force:
            print(f"images.base: {tag} exists (use --force to rebuild)")
            return
        print(f"images.base: {tag} {baseimage.build_base(tag, mirror, suite)}")
    except containers.ContainerError as e:
        raise Exit(f"images.base: {e}") from e


@task(help={"force": "rebuild even if the image exists",
            "release": f"which Ollama release: {', '.join(layout.OLLAMA_RELEASES)} (default: the serve image's)"})
def ollama(c: Context, force: bool = False, release: str = "") -> None:
    """Build Ollama from its pinned Go module sources on the local base image (Dockerfile.ollama; a newer
    release, for trying a bundle on it: Dockerfile.ollama-0.34)."""
    if release and release not in layout.OLLAMA_RELEASES:
        raise Exit(f"images.ollama: no Dockerfile builds Ollama {release}; these do: "
                   f"{', '.join(f'{r} ({d})' for r, d in layout.OLLAMA_RELEASES.items())}")
    tag = layout.ollama_image(release) if release else c.finetune.ollama_image
    dockerfile = layout.OLLAMA_RELEASES[release or layout.OLLAMA_SERVE_RELEASE]
    if not force and (labels := containers.image_labels(tag)) is not None:
        patches = labels.get(layout.OLLAMA_PATCHES_LABEL, "")
        if patches == (wanted := containers.dockerfile_label(dockerfile, layout.OLLAMA_PATCHES_LABEL)):
            print(f"images.ollama: {tag} exists (use --force to rebuild)")
            return
        print(f"images.ollama: rebuilding {tag}: it has the patches {patches or '(none)'}, {dockerfile} {wanted}")
    base(c)
    try:
        containers.build(dockerfile, tag, {"BASE_IMAGE": c.finetune.base_image})
    except containers.ContainerError as e:
        raise Exit(f"images.ollama: {e}") from e
    print(f"images.ollama: {tag} built")


@task(iterable=["case"],
      help={"case": f"only this case (repeatable): {', '.join(c.name for c in (*CASES, *PROMPT_CASES))}"})
def families(c: Context, case: list[str] | None = None) -> None:
    """Prove each chat-template family end to end: a tiny model with the family's real vocabulary and
    template, trained, converted and served; prompts and token ids compared (finetune/evaluation/families.py)."""
    if is_native(c):
        raise Exit("families: works with the stage images only (finetune.runner=docker)", code=2)
    names = [x.name for x in (*CASES, *PROMPT_CASES)]
    unknown = sorted(set(case or ()) - set(names))
    if unknown:
        raise Exit(f"families: unknown case {', '.join(unknown)}: use {', '.join(names)}", code=2)
    prompt_only = [x for x in PROMPT_CASES if not case or x.name in case]
    chosen = [x for x in CASES if not case or x.name in case or x.name in {p.stand_in for p in prompt_only}]
    train_image, convert_image = stage_image(c, "train"), stage_image(c, "convert")
    rows = {}
    try:
        source = families_.export_sources(convert_image)
        for x in chosen:
            print(f"families: {x.name} ({x.family}: {x.vocab} vocabulary, {x.template})", flush=True)
            row = rows[x.name] = families_.Row(x.name, x.family, x.vocab)
            row.test_cases = families_.build_base(x, train_image, source)["test_cases"]
            config = str(families_.write_config(x))
            try:
                train(c, config=config)
                convert(c, config=config)
                row.convert = "ok"
            except Exit as e:
                row.convert = "FAILED"
                row.problems.append(f"train or convert: {e.message}")
        done = [x for x in chosen if rows[x.name].convert == "ok"]
        if done:
            families_.compare(done, train_image, convert_image, stage_image(c, "serve"), rows)
        for x in prompt_only:
            rows[x.name] = families_.Row(x.name, x.family, x.vocab, runner="-", prompt_only=True)
            if x.stand_in not in {d.name for d in done}:
                rows[x.name].problems.append(f"its stand-in {x.stand_in} did not convert")
        if ready := [x for x in prompt_only if not rows[x.name].problems]:
            families_.compare_prompts(ready, train_image, stage_image(c, "serve"), rows)
    except (families_.FamilyError, containers.ContainerError) as e:
        raise Exit(f"families: {e}") from e
    report = families_.write_report(list(rows.values()))
    print(report.read_text(encoding="utf-8"))
    for row in rows.values():
        for problem in row.problems:
            print(f"families: {row.case}: {problem}", file=sys.stderr)
    if not all(r.ok for r in rows.values()):
        raise Exit(f"families: {sum(not r.ok for r in rows.values())} of {len(rows)} cases differ (see {report})")


@task(help={"k": "only tests matching this expression (pytest -k)", "m": "marker expression (pytest -m)"})
def test(c: Context, k: str | None = None, m: str | None = None) -> None:
    """Run the test suite (unit tests and the docker-marked tests that build and run real images)."""
    args = (f" -k {k!r}" if k else "") + (f" -m {m!r}" if m else "")
    c.run(f"{sys.executable} -m pytest{args}", pty=False)


images = Collection("images", base, ollama)
ns = Collection(data, train, convert, serve, chat, stop, export, eval, bench, verify, families, test, images)
ns.configure({
    "finetune": {
        "config": "configs/tiny-ja.yaml",
        "base_image": baseimage.DEFAULT_TAG,
        # Build every stage image FROM base_image (made by images.base) instead of its upstream default, for
        # machines that cannot reach a container registry: auto (when the upstream image cannot be pulled),
        # 1 or 0 (INVOKE_FINETUNE_LOCAL_BASE=1 forces the local base, =0 the upstream one).
        "local_base": "auto",
        # With local_base, the serve image is built FROM this Ollama (built from source by images.ollama).
        "ollama_image": layout.OLLAMA_IMAGE,
        # Redo every stage even when up to date (INVOKE_FINETUNE_FORCE=1); one stage: its --force.
        "force": False,
        # Where the stages run: docker (their images) or native (the host's Python, INVOKE_FINETUNE_RUNNER=native;
        # finetune/host/native.py), with native_python's venv and the `ollama` binary found as `ollama`.
        "runner": "docker",
        "native_python": "python3",
        "ollama": "ollama",
    },
})
