"""The images the tests run, built once on the test engine and cached by a content key.

No registry is reachable, so nothing is pulled: every image starts from a Debian root made by
`debootstrap` and `docker import`. Each image is tagged `<name>:<key>`, where the key is a hash
of everything that went into it (the key of its parent included), and carries it in the label
`lume.dev/test-key`; an image whose tag exists is never rebuilt, so a warm session builds
nothing. The engine's data root is a persistent cache (see `engine.py`).

- `lume-test-base`: `debootstrap --variant=minbase` of bookworm with python3, python3-venv and
  ca-certificates (key: the suite, variant and package list).
- `lume-test-python`: a stand-in for the official `python:3.11-slim-bookworm` image, which
  cannot be pulled: the base plus pip and `passwd` (useradd), pip allowed to install system-wide,
  `python` on PATH, and the host's CA bundle, so pip reaches PyPI through host networking here
  (only this test image carries the host's CA bundle, never the project's Dockerfile).
- `lume-operator`: the project's own `Dockerfile`, built as users build it (`docker build`, the
  classic builder: BuildKit would fetch its frontend image) on that stand-in, with
  `--network host`; key: the Dockerfile, .dockerignore, the lock, pyproject.toml, README.md and
  the operator's sources.
- `lume-examples`: `examples/Dockerfile` on that image: the examples baked in at /opt/examples,
  as a scientist bakes a project into the image its flows run in.

`python -m tests.containers.images` builds them all on the test engine and prints each build's
duration (0 when cached).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.containers.engine import DockerEngine, EngineUnavailable

ROOT = Path(__file__).resolve().parents[2]
KEY_LABEL = "lume.dev/test-key"
SUITE = "bookworm"
VARIANT = "minbase"
INCLUDE = ("python3", "python3-venv", "ca-certificates")
MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
EXAMPLES_DIR = "/opt/examples"
# What the operator image's build context holds (its .dockerignore lets only these through).
OPERATOR_INPUTS = ("Dockerfile", ".dockerignore", "requirements/operator.txt", "pyproject.toml")
OPERATOR_INPUTS += ("README.md",)
# What examples/.dockerignore keeps out of the examples image (a local run's leftovers).
EXAMPLES_SKIP = ("results", ".lume", "lume-results")
KEEP = 3  # keyed images of each name kept; older ones are removed after a build...
STALE_AFTER = 24 * 3600  # ...once they are a day old


class ImageBuildFailed(RuntimeError):
    """A build failed: the message holds the command and the end of its output."""


@dataclass
class Built:
    """What `ensure_*` did: the image's name and how long building it took (0: cached)."""

    tag: str
    seconds: float = 0.0
    parents: list[Built] = field(default_factory=list)

    def timings(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for parent in self.parents:
            out.update(parent.timings())
        out[self.tag] = round(self.seconds, 1)
        return out


def _digest(*parts: bytes | str) -> str:
    sha = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        sha.update(len(data).to_bytes(8, "big"))
        sha.update(data)
    return sha.hexdigest()[:16]


def _files(paths: Iterable[Path]) -> list[bytes | str]:
    """Relative names and contents of files, in a stable order, for a key."""
    parts: list[bytes | str] = []
    for path in sorted(paths):
        parts += [str(path.relative_to(ROOT)), path.read_bytes()]
    return parts


def _tree(directory: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """The files under `directory` that reach a build (what .dockerignore keeps out, out)."""
    skip = ("__pycache__", *skip)
    return [
        p
        for p in directory.rglob("*")
        if p.is_file()
        and not any(part in skip or part.endswith(".egg-info") for part in p.parts)
        and p.suffix != ".pyc"
    ]


def _exists(engine: DockerEngine, tag: str) -> bool:
    import docker

    client = engine.client
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def _build_lock(engine: DockerEngine, name: str) -> Iterator[None]:
    """One build of an image at a time on this engine, across sessions."""
    locks = engine.run / "build-locks"
    locks.mkdir(parents=True, exist_ok=True)
    with (locks / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(command: list[str], log: Path, *, env: dict[str, str] | None = None, **kw: object) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(command)}\n".encode())
        out.flush()
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, **kw)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise ImageBuildFailed(f"{' '.join(command[:3])} ... exited {proc.returncode}:\n{tail}")


def _docker_cli() -> str:
    cli = shutil.which("docker")
    if cli is None:
        raise EngineUnavailable(
            "the docker CLI is not installed (Debian: apt-get install docker.io)"
        )
    return cli


def docker_build(
    engine: DockerEngine,
    context: Path,
    tag: str,
    key: str,
    *,
    dockerfile: Path | None = None,
    build_args: dict[str, str] | None = None,
) -> None:
    """`docker build` as users run it: the classic builder, host networking, the key as label."""
    command = [_docker_cli(), "build", "--network", "host", "--tag", tag, "--label"]
    command += [f"{KEY_LABEL}={key}"]
    if dockerfile is not None:
        command += ["--file", str(dockerfile)]
    for name, value in (build_args or {}).items():
        command += ["--build-arg", f"{name}={value}"]
    command.append(str(context))
    env = {**os.environ, **engine.env, "DOCKER_BUILDKIT": "0"}
    _run(command, _log(engine, tag), env=env)


def _log(engine: DockerEngine, tag: str) -> Path:
    logs = engine.run / "build-logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs / f"{tag.replace(':', '-').replace('/', '_')}.log"


def _prune(engine: DockerEngine, name: str, keep: str) -> None:
    """Remove the keyed images of `name` beyond the newest KEEP that are over a day old (a
    session of another checkout may be about to run a recent one); their layers stay as build
    cache while a newer image shares them, and an image in use is left alone."""
    import docker

    cutoff = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - STALE_AFTER))
    client = engine.client
    try:
        images = client.images.list(name=name, filters={"label": KEY_LABEL})
        images.sort(key=lambda image: image.attrs.get("Created", ""), reverse=True)
        for image in images[KEEP:]:
            if image.attrs.get("Created", "") >= cutoff:
                continue
            for tag in image.tags:
                if tag != keep:
                    with contextlib.suppress(docker.errors.APIError):
                        client.images.remove(tag)
    finally:
        client.close()


def _ensure(engine: DockerEngine, name: str, key: str, build: object) -> Built:
    tag = f"{name}:{key}"
    if _exists(engine, tag):
        return Built(tag)
    with _build_lock(engine, name):
        if _exists(engine, tag):  # another session built it meanwhile
            return Built(tag)
        start = time.monotonic()
        build(tag)  # type: ignore[operator]
        seconds = time.monotonic() - start
    _prune(engine, name, tag)
    return Built(tag, seconds)


# ---- the images --------------------------------------------------------------------------------


def base_key() -> str:
    return _digest("base", SUITE, VARIANT, ",".join(INCLUDE))


def ensure_base(engine: DockerEngine) -> Built:
    """`lume-test-base:<key>`: debootstrap's Debian root, imported as an image."""

    def build(tag: str) -> None:
        if shutil.which("debootstrap") is None:
            raise EngineUnavailable(
                "debootstrap is not installed (Debian: apt-get install debootstrap; "
                "scripts/test does it)"
            )
        log = _log(engine, tag)
        work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=engine.root.parent))
        try:
            rootfs = work / "rootfs"
            command = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(INCLUDE)}"]
            _run([*command, SUITE, str(rootfs), MIRROR], log)
            # apt's lists and caches make the image larger and are stale by the next build.
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (rootfs / leftover).glob("*"):
                    if item.is_file():
                        item.unlink()
            repository, _, version = tag.partition(":")
            changes = [
                f"LABEL {KEY_LABEL}={version}",
                'CMD ["/bin/bash"]',
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV LANG=C.UTF-8",
            ]
            tar = subprocess.Popen(
                ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            client = engine.client
            try:
                client.api.import_image(
                    src=tar.stdout,
                    repository=repository,
                    tag=version,
                    changes=changes,
                    stream_src=True,
                )
            finally:
                client.close()
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait() != 0:
                error = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
                raise ImageBuildFailed(f"tar of the debootstrap root failed: {error}")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return _ensure(engine, "lume-test-base", base_key(), build)


PYTHON_DOCKERFILE = f"""\
# A stand-in for python:3.11-slim-bookworm (which cannot be pulled here): Debian's Python 3.11
# with pip and useradd, pip allowed to install outside a virtualenv (as in the official image),
# `python` on PATH, and the host's CA bundle so pip reaches PyPI through host networking.
ARG BASE
FROM $BASE
RUN apt-get update \\
    && apt-get install -y --no-install-recommends python3-pip passwd \\
    && rm -rf /var/lib/apt/lists/* \\
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \\
    && ln -s /usr/bin/python3 /usr/local/bin/python
COPY ca-certificates.crt {HOST_CA_BUNDLE}
ENV PIP_CERT={HOST_CA_BUNDLE}
CMD ["python3"]
"""


def python_key(base: str) -> str:
    ca = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.exists() else b""
    return _digest("python", base, PYTHON_DOCKERFILE, ca)


def ensure_python(engine: DockerEngine) -> Built:
    """`lume-test-python:<key>`: the stand-in for the official slim Python image."""
    base = ensure_base(engine)

    def build(tag: str) -> None:
        with tempfile.TemporaryDirectory(prefix="lume-python-") as tmp:
            context = Path(tmp)
            (context / "Dockerfile").write_text(PYTHON_DOCKERFILE)
            shutil.copyfile(HOST_CA_BUNDLE, context / "ca-certificates.crt")
            docker_build(engine, context, tag, tag.partition(":")[2], build_args={"BASE": base.tag})

    built = _ensure(engine, "lume-test-python", python_key(base.tag), build)
    built.parents.append(base)
    return built


def operator_key(python: str) -> str:
    files = [ROOT / name for name in OPERATOR_INPUTS] + _tree(ROOT / "operator")
    return _digest("operator", python, *_files(files))


def ensure_operator(engine: DockerEngine) -> Built:
    """`lume-operator:<key>`: the project's Dockerfile on the stand-in Python image."""
    python = ensure_python(engine)

    def build(tag: str) -> None:
        docker_build(
            engine, ROOT, tag, tag.partition(":")[2], build_args={"PYTHON_IMAGE": python.tag}
        )

    built = _ensure(engine, "lume-operator", operator_key(python.tag), build)
    built.parents.append(python)
    return built


def examples_key(operator: str) -> str:
    return _digest("examples", operator, *_files(_tree(ROOT / "examples", EXAMPLES_SKIP)))


def ensure_examples(engine: DockerEngine) -> Built:
    """`lume-examples:<key>`: examples/Dockerfile, the examples baked into the operator image."""
    operator = ensure_operator(engine)

    def build(tag: str) -> None:
        docker_build(
            engine,
            ROOT / "examples",
            tag,
            tag.partition(":")[2],
            build_args={"BASE_IMAGE": operator.tag},
        )

    built = _ensure(engine, "lume-examples", examples_key(operator.tag), build)
    built.parents.append(operator)
    return built


def main() -> int:
    from tests.containers.engine import acquire, release

    engine = acquire()
    try:
        start = time.monotonic()
        built = ensure_examples(engine)
        print(json.dumps({**built.timings(), "total": round(time.monotonic() - start, 1)}))
    finally:
        release(engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
