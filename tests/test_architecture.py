"""The layout is the architecture: finetune/core is shared, finetune/train and finetune/convert run in their
images and import nothing else, host code never imports the training or conversion code, no module imports
itself in a circle; each stage reads only the config keys it declares; and, with the real images, an edit to
host code leaves the train and convert images, hence their cache keys, unchanged."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from support import ROOT

from finetune.core import layout
from finetune.core.config import load_config
from finetune.core.stage import Stage, UndeclaredKey
from finetune.host import cache
from finetune.serve import modelfiles

PACKAGE = ROOT / "finetune"
# What the code in each folder may import from the package: an image copies core and its own folder only,
# and host code reads a stage's declaration (its __init__) but never its code.
ALLOWED = {
    "core": {"core"},
    "train": {"core", "train"},
    "convert": {"core", "convert"},
    "serve": {"core", "serve", "host"},
    "host": {"core", "host", "train/__init__", "convert/__init__", "serve/__init__"},
    "evaluation": {"core", "host", "serve", "evaluation"},
    "bench": {"core", "host", "serve", "bench"},
}


def target(imported: str) -> str:
    """The folder an import lands in: `core`, or `train/__init__` for the train stage's declaration alone."""
    parts = imported.split(".")
    return f"{parts[1]}/__init__" if len(parts) == 2 else parts[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The finetune modules `path` imports anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            base = node.module
            for alias in node.names:  # `from finetune.core import layout` imports the module finetune.core.layout
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (ROOT / Path(*candidate.split("."))).with_suffix(".py").is_file()
                          or (ROOT / Path(*candidate.split("."))).is_dir() else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("finetune")}
    return found


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_each_folder_imports_only_what_its_image_or_the_host_has():
    wrong = []
    for name, path in sources().items():
        folder = path.relative_to(PACKAGE).parts[0]
        if folder not in ALLOWED or path.name == "plain_sft.py":  # the bench's plain script stands alone
            continue
        for imported in imports(path) - {"finetune"}:
            where = target(imported)
            if where not in ALLOWED[folder] and where.split("/")[0] not in ALLOWED[folder]:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_tasks_imports_no_in_image_code():
    found = imports(ROOT / "tasks.py")
    assert not {m for m in found if m.startswith(("finetune.train.", "finetune.convert."))}, found


def test_no_import_circles():
    graph = {name: {m for m in imports(path) if m in sources()} - {name} for name, path in sources().items()}
    # A package's __init__ is imported by its submodules' imports; only module-to-module arrows count.
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join([*trail[trail.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_every_module_opens_with_what_it_owns():
    missing = [name for name, path in sources().items()
               if path.stat().st_size and not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]
    assert not missing, missing


def test_images_copy_only_core_and_their_stage():
    for stage in ("train", "convert"):
        copies = [line.split()[1] for line in (ROOT / f"Dockerfile.{stage}").read_text().splitlines()
                  if line.startswith("COPY finetune")]
        assert copies == ["finetune/__init__.py", "finetune/core", f"finetune/{stage}"], (stage, copies)


# ---- the stage declarations ----

DEMO = Stage("demo", params=("model.id", "serve"), files=("data.train",), upstream="train", outs=("demo",))


def config(*overrides: str):
    return load_config(ROOT / "configs" / "tiny-ja.yaml", list(overrides), root=ROOT)


def test_a_stage_reads_what_it_declares_and_is_refused_the_rest_naming_where_to_declare():
    view = DEMO.view(config())
    assert view.model.id == "builtin:tiny-llama" and view.serve.port == 11434  # declared, and below a declared key
    with pytest.raises(UndeclaredKey, match=r"the demo stage read the config key model\.revision, which its "
                                            r"declaration \(finetune/demo/__init__\.py, STAGE\.params\)"):
        _ = view.model.revision
    with pytest.raises(UndeclaredKey, match="config key train,"):
        _ = view.train
    with pytest.raises(AttributeError, match="read-only"):
        view.run = "other"


def test_what_a_stage_read_is_its_declared_values_and_file_digests():
    read = DEMO.read(config(), ROOT)
    assert set(read["config"]) == {"model.id"} | {k for k in read["config"] if k.startswith("serve.")}
    assert "serve.port" in read["config"] and "train.rank" not in read["config"]
    assert list(read["files"]) == ["data/customer_support_ja/train.jsonl"] and len(read["files"].popitem()[1]) == 64


def test_the_cache_key_comes_from_the_declaration_and_ignores_undeclared_keys(tmp_path):
    key = lambda stage, *o: cache.stage_inputs(stage, config(*o), tmp_path, "sha256:img", ROOT).key  # noqa: E731
    assert key("train") == key("train", "serve.temperature=0.1", "eval.max_new_tokens=8", "bench.repeats=1")
    assert key("train") != key("train", "train.rank=8")
    assert key("convert") == key("convert", "train.rank=8")  # reaches convert through train's key, not its own
    assert key("serve") != key("serve", "serve.temperature=0.1")


def test_the_serve_stage_writes_its_modelfiles_reading_only_declared_keys(tmp_path):
    """write_modelfiles runs on the host, through the stage's declared view: an undeclared read would raise."""
    cfg = config()
    run = tmp_path / "run"
    (run / "convert").mkdir(parents=True)
    for quant in (cfg.convert.outtype, *cfg.convert.quant_types):
        (run / "convert" / layout.model_gguf(quant)).write_bytes(b"GGUF")
    (run / "convert" / layout.base_gguf(cfg.serve.quant)).write_bytes(b"GGUF")
    (run / "convert" / layout.CHAT_FORMAT).write_text('{"family": "llama3"}')
    out = modelfiles.write_modelfiles(cfg, run)
    assert "<|eot_id|>" in (out / layout.MODELFILE).read_text(), "the Modelfile is the trained family's"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [layout.MODELFILE, layout.BASELINE_MODELFILE, layout.MODELS_LIST,
         *(layout.quant_modelfile(q) for q in (cfg.convert.outtype, *cfg.convert.quant_types) if q != cfg.serve.quant)])


def test_every_stage_is_declared_with_its_upstream_and_outputs():
    assert list(cache.STAGES) == list(layout.STAGES)
    assert [s.upstream for s in cache.STAGES.values()] == [None, "train", "convert"]
    assert all(s.outs == (s.name,) for s in cache.STAGES.values())


# ---- host code cannot change a stage image ----

@pytest.mark.docker
def test_touching_host_code_leaves_the_train_and_convert_images_and_keys_unchanged(tmp_path):
    """Build the train and convert images from a copy of the tree whose host modules (and the serve, eval and
    bench code) were edited: the layer cache gives the same image IDs, so the stage keys cannot change."""
    from invoke import Config, Context

    import tasks

    c = Context(config=Config(overrides=tasks.ns.configuration()))
    copy = tmp_path / "tree"
    copy.mkdir()
    for name in (".dockerignore", "Dockerfile.train", "Dockerfile.convert"):
        shutil.copy2(ROOT / name, copy / name)
    for folder in ("finetune", "requirements", "docker"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for edited in ("host/cache.py", "evaluation/report.py", "bench/common.py", "serve/server.py"):
        with (copy / "finetune" / edited).open("a") as f:
            f.write("\n# an edit to host code\n")
    for stage in ("train", "convert"):
        before = tasks.stage_image(c, stage)
        ours = containers_id(before)
        touched = tasks.stage_image(c, stage, context=str(copy), tag=f"finetune-{stage}:touched")
        assert containers_id(touched) == ours, stage
        inputs = lambda image: cache.stage_inputs(stage, config(), tmp_path, image, ROOT).key  # noqa: E731
        assert inputs(containers_id(touched)) == inputs(ours)
    with (copy / "finetune" / "train" / "sft.py").open("a") as f:  # the stage's own code does change it
        f.write("\n# an edit to the train stage\n")
    assert containers_id(tasks.stage_image(c, "train", context=str(copy), tag="finetune-train:touched")) != \
        containers_id(layout.image_tag("train"))


def containers_id(tag: str) -> str:
    from finetune.host import containers

    return containers.client().images.get(tag).id
