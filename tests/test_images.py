"""Images without a registry: `invoke images.base` builds a Debian base image from distro packages, and a
stage container started through finetune.host.containers writes into its mounted volume as a non-root user,
leaving files that belong to the invoking user (or to the images' user when invoke runs as root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from finetune.host import baseimage, containers
from finetune.host.containers import Mount

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def base_image() -> str:
    """The local base image, built by the real task (debootstrap + docker import) unless already there."""
    subprocess.run([str(ROOT / "invoke"), "images.base"], cwd=ROOT, check=True)
    return baseimage.DEFAULT_TAG


def test_host_mirror_reads_deb822_and_one_line_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\n\nTypes: deb\nURIs: http://mirror.example/debian\n")
    assert baseimage.host_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert baseimage.host_mirror(tmp_path) == "http://other.example/debian"


@pytest.mark.docker
def test_base_image_is_bookworm_with_apt(base_image):
    image = containers.client().images.get(base_image)
    assert image.labels["org.opencontainers.image.description"] == "debootstrap-bookworm-minbase"
    assert image.labels["finetune.base.mirror"].startswith("http")
    out = containers.client().containers.run(base_image, ["sh", "-c", ". /etc/os-release; echo $VERSION_CODENAME; "
                                                          "apt-get --version | head -1"], remove=True)
    codename, apt = out.decode().splitlines()
    assert codename == "bookworm" and apt.startswith("apt 2.6")


@pytest.mark.docker
def test_container_writes_mounted_volume_as_invoking_user(base_image, tmp_path):
    out = tmp_path / "artifacts" / "train"
    script = "id -u > /out/uid && echo hello > /out/hello.txt && mkdir /out/sub && touch /out/sub/file"
    code = containers.run(base_image, ["sh", "-c", script], [Mount(out, "/out", read_only=False)])
    assert code == 0
    expected = os.getuid() if os.getuid() != 0 else containers.IMAGE_UID
    assert (out / "uid").read_text().strip() == str(expected) != "0"
    for path in [out, *out.rglob("*")]:
        assert path.stat().st_uid == expected, path


@pytest.mark.docker
def test_container_runs_as_a_given_user(base_image, tmp_path):
    """What a non-root developer gets: files owned by their own uid:gid (simulated with 4321:4321)."""
    out = tmp_path / "out"
    if os.getuid() != 0:
        pytest.skip("handing a directory to another uid needs root")
    code = containers.run(base_image, ["sh", "-c", "touch /out/made"], [Mount(out, "/out", False)], user="4321:4321")
    assert code == 0
    stat = (out / "made").stat()
    assert (stat.st_uid, stat.st_gid) == (4321, 4321)


@pytest.mark.docker
def test_inputs_are_mounted_read_only(base_image, tmp_path):
    inputs = tmp_path / "data"
    inputs.mkdir()
    (inputs / "train.jsonl").write_text("{}\n")
    code = containers.run(base_image, ["sh", "-c", "echo changed > /data/train.jsonl"], [Mount(inputs, "/data")])
    assert code != 0
    assert (inputs / "train.jsonl").read_text() == "{}\n"
