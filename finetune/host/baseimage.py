"""A Debian base image built from distro packages, for machines that cannot pull images.

    python -m finetune.host.baseimage [--suite bookworm] [--tag finetune-base:<suite>] [--mirror URL]   (as root)

`debootstrap --variant=minbase` fills a directory from the Debian mirror that the host's apt already uses;
the tree, minus logs and caches, is packed as a tar with sorted names and fixed times and imported as
an image. Each Dockerfile then builds `--build-arg BASE_IMAGE=<this tag>` instead of its upstream default.
The package versions are whatever the mirror serves that day; the image records its build date and
mirror in labels. The suite follows the Dockerfile's upstream default (`debian:<suite>-slim`): bookworm for
train and Ollama, trixie for convert (its CPU build of torch is Debian's python3-torch).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from finetune.core import layout
from finetune.host.containers import ContainerError, client

DEFAULT_TAG = layout.BASE_IMAGE
SUITE = "bookworm"
SUITES = ("bookworm", "trixie")
# Written by debootstrap/dpkg/apt at build time; they differ between two builds and nothing needs them.
VOLATILE = ("var/log", "var/cache/apt", "var/cache/ldconfig", "var/lib/apt/lists", "tmp")


def host_mirror(apt_dir: Path = Path("/etc/apt")) -> str | None:
    """The first Debian archive URI the host's apt is configured with (deb822 .sources or sources.list)."""
    files = sorted(apt_dir.glob("sources.list.d/*.sources")) + [apt_dir / "sources.list"]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        uris = re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M)
        for uri in uris:
            if "security" not in uri:
                return uri
    return None


def build_base(tag: str = DEFAULT_TAG, mirror: str | None = None, suite: str = SUITE) -> str:
    """debootstrap `suite` and import it as `tag`; return the image id. Needs root and debootstrap."""
    if suite not in SUITES:
        raise ContainerError(f"no local base for Debian {suite!r}: these build: {', '.join(SUITES)}")
    mirror = mirror or host_mirror()
    if mirror is None:
        raise ContainerError("no Debian mirror found in /etc/apt; pass --mirror URL (a Debian archive)")
    if os.geteuid() != 0:
        raise ContainerError("debootstrap needs root: run `sudo invoke images.base`")
    if shutil.which("debootstrap") is None:
        raise ContainerError("debootstrap is not installed: `sudo apt-get install -y debootstrap`")
    engine = client()
    with tempfile.TemporaryDirectory(prefix="finetune-base-") as tmp:
        rootfs, archive = Path(tmp, "rootfs"), Path(tmp, "rootfs.tar")
        print(f"images.base: debootstrap {suite} from {mirror}", file=sys.stderr)
        done = subprocess.run(["debootstrap", "--variant=minbase", suite, str(rootfs), mirror],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.splitlines()[-5:])
            raise ContainerError(f"debootstrap failed (exit {done.returncode}):\n{tail}\n"
                                 f"check that {mirror} serves {suite}, or pass --mirror")
        for rel in VOLATILE:
            for child in (rootfs / rel).glob("*"):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        subprocess.run(["tar", "--sort=name", "--mtime=@0", "--numeric-owner", "--xattrs", "-C", str(rootfs),
                        "-cf", str(archive), "."], check=True)
        repository, _, version = tag.partition(":")
        today = datetime.date.today().isoformat()
        changes = [
            'CMD ["/bin/bash"]',
            "ENV LANG=C.UTF-8",
            f"LABEL org.opencontainers.image.description=debootstrap-{suite}-minbase",
            f"LABEL finetune.base.mirror={mirror}",
            f"LABEL finetune.base.date={today}",
        ]
        engine.api.import_image_from_file(str(archive), repository=repository, tag=version or "latest",
                                          changes=changes)
    return engine.images.get(tag).id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the local Debian base image from distro packages.")
    parser.add_argument("--suite", default=SUITE, choices=SUITES)
    parser.add_argument("--tag", help="image tag (default: finetune-base:<suite>)")
    parser.add_argument("--mirror", help="Debian archive URL (default: the host's apt mirror)")
    args = parser.parse_args(argv)
    try:
        tag = args.tag or layout.base_image(args.suite)
        image_id = build_base(tag, args.mirror, args.suite)
    except ContainerError as e:
        print(f"images.base: {e}", file=sys.stderr)
        return 1
    print(f"{tag} {image_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
