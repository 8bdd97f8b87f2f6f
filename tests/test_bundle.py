"""`invoke export`'s bundle without Docker: the archive's bytes depend only on the files' contents, the eval
summary is the bundled GGUF's only, and a run that was not converted, served and recorded is refused with
the command to run. (A fresh Ollama creating
the bundle and answering as the served model does: tests/test_serve.py.)"""

from __future__ import annotations

import json
import os
import tarfile

import pytest
from support import ROOT

from finetune.core.config import load_config
from finetune.serve import bundle
from finetune.serve.modelfiles import ServeError


def test_the_archive_depends_only_on_the_files_contents(tmp_path):
    archives = []
    for i, mtime in enumerate((1_000_000, 2_000_000)):
        folder = tmp_path / str(i) / "model"
        folder.mkdir(parents=True)
        for name, text in (("b.gguf", "weights"), ("Modelfile", "FROM ./b.gguf\n")):
            (folder / name).write_text(text)
            os.utime(folder / name, (mtime, mtime))
        archives.append(tmp_path / f"{i}.tar")
        bundle.write_tar(folder, archives[-1])
    assert archives[0].read_bytes() == archives[1].read_bytes()
    with tarfile.open(archives[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["model", "model/Modelfile", "model/b.gguf"]
    assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 0, 0)}


def test_a_run_without_its_served_model_is_refused_with_the_command_to_run(tmp_path):
    config = load_config(ROOT / "configs" / "tiny-ja.yaml", root=ROOT)
    with pytest.raises(ServeError, match="run `invoke convert` first"):
        bundle.export(config, tmp_path)
    assert not (tmp_path / bundle.EXPORT).exists()


def test_the_eval_summary_is_the_bundled_ggufs_and_leaves_the_timings_out(tmp_path):
    (tmp_path / "eval").mkdir()
    metrics = {"chrf": 93.1, "stop_rate": 1.0, "latency_s": 0.02, "tokens_per_s": 2700.0}
    (tmp_path / "eval" / "results.json").write_text(json.dumps({
        "split": "eval", "questions": 53, "gate": {"failures": []}, "quants": [{"type": "Q8_0", "sha256": "aa"}],
        "models": {"fine-tuned Q8_0": {"metrics": metrics, "answers": ["…"]}}}))
    assert bundle.eval_summary(tmp_path, "aa") == {"split": "eval", "questions": 53, "gate": {"failures": []},
                                                   "metrics": {"fine-tuned Q8_0": {"chrf": 93.1, "stop_rate": 1.0}}}
    assert bundle.eval_summary(tmp_path, "bb") is None  # an eval of an earlier model of the run
