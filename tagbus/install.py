"""Installation steps for the local stack: system tools, kinesis-mock, DynamoDB Local, KCL jars, grpcurl.

Everything downloaded lands under ``<root>/.tagbus/`` and is reused when present, so a
second ``make setup`` makes no network calls. Each step checks for the system tool it
needs first and fails with one line naming the Debian package to install.

Workarounds recorded here (why the code looks the way it does):

* amazon-kclpy's ``pom.xml`` asks for KCL 3.5.3, whose ``amazon-kinesis-client-multilang``
  jar is not served by the Maven Central we can reach; the newest 3.x multilang jar that
  is served is ``KCL_VERSION``. We resolve kclpy's own pom with ``-Dkcl.version=...``.
* amazon-kclpy's ``setup.py`` downloads every jar of its pom from Maven Central while
  building the wheel (``bdist_wheel`` is overridden) and fails the build when one is
  missing. We build it from its sdist with the pom's ``kcl.version`` set to the same
  override and the jars that Maven already fetched placed in ``amazon_kclpy/jars``, so
  its downloader finds every jar present and skips the network.
* grpcurl (the outside gRPC client the config server is checked with) is not packaged by
  Debian; it is built from its Go module with ``go install`` into ``.tagbus/bin``.
* DynamoDB Local needs sqlite4java's native library; Maven delivers it as
  ``libsqlite4java-linux-amd64-<ver>.so`` and sqlite4java looks for
  ``libsqlite4java-linux-amd64.so`` on ``java.library.path``, so it is copied to that name.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DYNAMODB_LOCAL_VERSION",
    "GRPCURL_VERSION",
    "KCLPY_VERSION",
    "KCL_VERSION",
    "KINESIS_LOCAL_VERSION",
    "SYSTEM_PACKAGES",
    "DynamoDBLocalLayout",
    "InstallError",
    "MissingToolError",
    "ensure_system_packages",
    "find_postgres_bindir",
    "install_all",
    "install_dynamodb_local",
    "install_grpcurl",
    "install_kcl_jars",
    "install_kclpy",
    "install_kinesis_mock",
    "install_promtool",
    "main",
    "require_tool",
    "state_dir",
]

KINESIS_LOCAL_VERSION = "0.6.2"
DYNAMODB_LOCAL_VERSION = "3.3.1"
KCLPY_VERSION = "3.2.0"
# Newest amazon-kinesis-client-multilang 3.x served (3.5.3 from kclpy's pom is not).
KCL_VERSION = "3.1.3"
GRPCURL_VERSION = "v1.9.4"
GRPCURL_MODULE = "github.com/fullstorydev/grpcurl/cmd/grpcurl"

# tool on PATH -> Debian package that provides it
SYSTEM_PACKAGES: dict[str, str] = {
    "java": "openjdk-17-jre-headless",
    "mvn": "maven",
    "node": "nodejs",
    "npm": "npm",
    # the load generator of `make bench`
    "wrk": "wrk",
    # builds grpcurl (install_grpcurl); Go's own toolchain under /usr/local/go is used when present
    "go": "golang-go",
}
#: Where a Go toolchain installed outside Debian's packages usually lives (not always on PATH).
_GO_FALLBACKS = ("/usr/local/go/bin/go", "/usr/lib/go/bin/go")
POSTGRES_PACKAGE = "postgresql"
_POSTGRES_GLOB = "/usr/lib/postgresql/*/bin"
_MAVEN_NS = "http://maven.apache.org/POM/4.0.0"


class InstallError(RuntimeError):
    """An installation step failed; the message names the step and where to look."""


class MissingToolError(InstallError):
    """A system tool is missing; the message says which Debian package provides it."""


@dataclass(frozen=True)
class DynamoDBLocalLayout:
    """Where DynamoDB Local's jars and native library live once installed."""

    lib_dir: Path
    native_dir: Path

    @property
    def classpath(self) -> str:
        return str(self.lib_dir / "*")


def state_dir(root: Path) -> Path:
    """The ``.tagbus`` folder under ``root`` that holds all local state."""
    return root.resolve() / ".tagbus"


def require_tool(name: str) -> str:
    """Absolute path of ``name`` on PATH, or MissingToolError naming the package to install."""
    found = _which(name)
    if found is None:
        package = SYSTEM_PACKAGES.get(name, name)
        raise MissingToolError(
            f"'{name}' not found: install it with `apt-get install -y {package}` (or `make setup` as root)"
        )
    return found


def find_postgres_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` that has initdb and postgres."""
    candidates = [
        Path(p)
        for p in glob.glob(_POSTGRES_GLOB)
        if (Path(p) / "initdb").is_file() and (Path(p) / "postgres").is_file()
    ]
    if not candidates:
        raise MissingToolError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/<ver>/bin: "
            f"install them with `apt-get install -y {POSTGRES_PACKAGE}` (or `make setup` as root)"
        )

    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    return max(candidates, key=version_key)


def ensure_system_packages(*, dry_run: bool = False) -> list[str]:
    """Apt-install the Debian packages whose tools are missing; returns the packages installed.

    Only acts as root (``make setup``); as another user it raises MissingToolError for the
    first missing tool instead, since installing needs root.
    """
    missing = [pkg for tool, pkg in SYSTEM_PACKAGES.items() if _which(tool) is None]
    try:
        find_postgres_bindir()
    except MissingToolError:
        missing.append(POSTGRES_PACKAGE)
    if not missing or dry_run:
        return missing
    if os.geteuid() != 0:
        raise MissingToolError(
            f"missing system packages {' '.join(missing)}: run `apt-get install -y {' '.join(missing)}` as root"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update"], step="apt-get update", env=env)
    _run(
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        step="apt-get install",
        env=env,
    )
    return missing


def install_kinesis_mock(root: Path) -> Path:
    """Install npm ``kinesis-local`` under ``.tagbus/kinesis-mock``; returns its package folder."""
    prefix = state_dir(root) / "kinesis-mock"
    package_dir = prefix / "node_modules" / "kinesis-local"
    if _installed_npm_version(package_dir) == KINESIS_LOCAL_VERSION:
        return package_dir
    npm = require_tool("npm")
    require_tool("node")
    prefix.mkdir(parents=True, exist_ok=True)
    _run(
        [
            npm,
            "install",
            "--prefix",
            str(prefix),
            "--no-audit",
            "--no-fund",
            "--no-save",
            f"kinesis-local@{KINESIS_LOCAL_VERSION}",
        ],
        step="npm install kinesis-local",
        cwd=prefix,
    )
    if not (package_dir / "main.js").is_file():
        raise InstallError(f"npm install kinesis-local left no main.js in {package_dir}")
    return package_dir


def install_dynamodb_local(root: Path) -> DynamoDBLocalLayout:
    """Fetch DynamoDB Local and its dependencies from Maven Central into ``.tagbus/dynamodb-local``."""
    home = state_dir(root) / "dynamodb-local"
    layout = DynamoDBLocalLayout(lib_dir=home / "lib", native_dir=home / "native")
    main_jar = layout.lib_dir / f"DynamoDBLocal-{DYNAMODB_LOCAL_VERSION}.jar"
    native = layout.native_dir / "libsqlite4java-linux-amd64.so"
    if main_jar.is_file() and native.is_file():
        return layout
    home.mkdir(parents=True, exist_ok=True)
    pom = home / "pom.xml"
    pom.write_text(_DYNAMODB_LOCAL_POM.format(version=DYNAMODB_LOCAL_VERSION))
    _copy_dependencies(pom, layout.lib_dir, step="mvn DynamoDBLocal")
    sos = sorted(layout.lib_dir.glob("libsqlite4java-linux-amd64*.so"))
    if not sos:
        raise InstallError(f"no libsqlite4java-linux-amd64*.so among {layout.lib_dir}")
    layout.native_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sos[-1], native)
    return layout


def install_kcl_jars(root: Path) -> Path:
    """Resolve the MultiLangDaemon jars with amazon-kclpy's own pom into ``.tagbus/kcl-jars``."""
    jars = state_dir(root) / "kcl-jars"
    if (jars / f"amazon-kinesis-client-multilang-{KCL_VERSION}.jar").is_file():
        return jars
    source = _kclpy_source(root)
    build = state_dir(root) / "kcl"
    pom = build / "pom.xml"
    pom.write_text(_resolvable_pom((source / "pom.xml").read_text()))
    _copy_dependencies(pom, jars, step="mvn KCL MultiLangDaemon", extra=[f"-Dkcl.version={KCL_VERSION}"])
    return jars


def install_kclpy(root: Path, *, python: Path | None = None) -> None:
    """Pip-install amazon-kclpy's Python side into the venv without its jar download.

    See the module docstring for why the sdist's pom is pinned and pre-seeded.
    """
    interpreter = python or _venv_python(root)
    check = subprocess.run(
        [str(interpreter), "-c", "import importlib.metadata as m; print(m.version('amazon_kclpy'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode == 0 and check.stdout.strip() == KCLPY_VERSION:
        return
    jars = install_kcl_jars(root)
    source = _kclpy_source(root)
    pom = source / "pom.xml"
    text = pom.read_text()
    pinned = re.sub(r"<kcl\.version>[^<]*</kcl\.version>", f"<kcl.version>{KCL_VERSION}</kcl.version>", text)
    pom.write_text(pinned)
    target = source / "amazon_kclpy" / "jars"
    for jar in jars.glob("*.jar"):
        if not (target / jar.name).is_file():
            shutil.copyfile(jar, target / jar.name)
    _run(
        [str(interpreter), "-m", "pip", "install", "--quiet", str(source)],
        step="pip install amazon-kclpy",
        env={**os.environ, "KCL_MVN_REPO_SEARCH_URL": "file:///nonexistent/"},
    )


def install_grpcurl(root: Path) -> Path:
    """Build grpcurl with ``go install`` into ``.tagbus/bin``; returns its path (kept when present)."""
    bindir = state_dir(root) / "bin"
    target = bindir / "grpcurl"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    go = require_tool("go")
    bindir.mkdir(parents=True, exist_ok=True)
    # GOFLAGS=-mod=mod: a checkout's own go.work or vendor folder must not steer this build.
    env = {**os.environ, "GOBIN": str(bindir), "GOFLAGS": "-mod=mod", "GOWORK": "off"}
    _run([go, "install", f"{GRPCURL_MODULE}@{GRPCURL_VERSION}"], step="go install grpcurl", cwd=bindir, env=env)
    if not target.is_file():
        raise InstallError(f"go install grpcurl left no {target}")
    return target


def install_promtool(root: Path) -> Path:
    """Unpack ``promtool`` from Debian's ``prometheus`` package into ``.tagbus/bin``; returns its path.

    The package is downloaded and unpacked, not installed: installing it would also start a
    Prometheus server. promtool checks and tests the alert rules in ``deploy/prometheus``.
    """
    bindir = state_dir(root) / "bin"
    target = bindir / "promtool"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    work = state_dir(root) / "prometheus-deb"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        try:
            _run(["apt-get", "download", "prometheus"], step="apt-get download prometheus", cwd=work)
        except InstallError:
            # An old package list names a version the mirror no longer serves.
            _run(["apt-get", "update"], step="apt-get update")
            _run(["apt-get", "download", "prometheus"], step="apt-get download prometheus", cwd=work)
        debs = sorted(work.glob("prometheus_*.deb"))
        if not debs:
            raise InstallError(f"apt-get download prometheus left no .deb in {work}")
        _run(["dpkg-deb", "-x", str(debs[-1]), str(work / "root")], step="dpkg-deb -x prometheus")
        bindir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "root" / "usr" / "bin" / "promtool", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _optional_promtool(root: Path) -> None:
    # Only one test needs it (it skips without): a mirror hiccup must not fail the setup.
    try:
        install_promtool(root)
    except (InstallError, OSError) as e:
        print(f"tagbus.install: promtool skipped, the alert rules' promtool test will skip: {e}", file=sys.stderr)


def install_all(root: Path, *, python: Path | None = None) -> None:
    """Every download step the local stack needs (``make setup`` after system packages)."""
    find_postgres_bindir()
    require_tool("java")
    install_kinesis_mock(root)
    install_dynamodb_local(root)
    install_kcl_jars(root)
    install_kclpy(root, python=python)
    install_grpcurl(root)


# -- helpers ---------------------------------------------------------------------------

_DYNAMODB_LOCAL_POM = """<?xml version="1.0" encoding="UTF-8"?>
<!-- generated by tagbus.install: fetches DynamoDB Local with its dependencies -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.tagbus</groupId>
  <artifactId>dynamodb-local</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>software.amazon.dynamodb</groupId>
      <artifactId>DynamoDBLocal</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""


def _resolvable_pom(kclpy_pom: str) -> str:
    """kclpy's pom has no coordinates of its own; Maven needs them to resolve it."""
    ET.register_namespace("", _MAVEN_NS)
    project = ET.fromstring(kclpy_pom)
    ns = f"{{{_MAVEN_NS}}}"
    for index, (tag, value) in enumerate(
        (("groupId", "local.tagbus"), ("artifactId", "kcl-multilang"), ("version", "1"), ("packaging", "pom")),
        start=1,
    ):
        if project.find(ns + tag) is None:
            element = ET.Element(ns + tag)
            element.text = value
            project.insert(index, element)
    return ET.tostring(project, encoding="unicode", xml_declaration=True)


def _kclpy_source(root: Path) -> Path:
    """The unpacked amazon-kclpy sdist under ``.tagbus/kcl`` (downloaded once with pip)."""
    build = state_dir(root) / "kcl"
    source = build / f"amazon_kclpy-{KCLPY_VERSION}"
    if (source / "pom.xml").is_file():
        return source
    build.mkdir(parents=True, exist_ok=True)
    sdist = build / f"amazon_kclpy-{KCLPY_VERSION}.tar.gz"
    if not sdist.is_file():
        _run(
            [
                str(_venv_python(root)),
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(build),
                f"amazon-kclpy=={KCLPY_VERSION}",
            ],
            step="pip download amazon-kclpy sdist",
        )
    with tarfile.open(sdist) as archive:
        archive.extractall(build, filter="data")
    return source


def _copy_dependencies(pom: Path, output: Path, *, step: str, extra: list[str] | None = None) -> None:
    mvn = require_tool("mvn")
    require_tool("java")
    output.mkdir(parents=True, exist_ok=True)
    _run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={output}",
            "-DincludeScope=runtime",
            *(extra or []),
        ],
        step=step,
        cwd=pom.parent,
    )


def _which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found is None and tool == "go":
        found = next((p for p in _GO_FALLBACKS if os.access(p, os.X_OK)), None)
    return found


def _installed_npm_version(package_dir: Path) -> str | None:
    manifest = package_dir / "package.json"
    if not manifest.is_file() or not (package_dir / "main.js").is_file():
        return None
    match = re.search(r'"version"\s*:\s*"([^"]+)"', manifest.read_text())
    return match.group(1) if match else None


def _venv_python(root: Path) -> Path:
    candidate = root / ".venv" / "bin" / "python"
    return candidate if candidate.is_file() else Path(sys.executable)


def _run(argv: list[str], *, step: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
        raise InstallError(f"{step} failed (exit {result.returncode}): " + "\n".join(tail))


def main(argv: list[str] | None = None) -> int:
    """``python -m tagbus.install [ROOT]``: system packages (as root), then every download step."""
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path.cwd()
    steps: list[tuple[str, Callable[[], object]]] = [
        ("system packages", ensure_system_packages),
        ("postgres binaries", find_postgres_bindir),
        ("java", lambda: require_tool("java")),
        ("kinesis-mock (npm kinesis-local)", lambda: install_kinesis_mock(root)),
        ("DynamoDB Local (Maven)", lambda: install_dynamodb_local(root)),
        (f"KCL {KCL_VERSION} MultiLangDaemon jars (Maven)", lambda: install_kcl_jars(root)),
        (f"amazon-kclpy {KCLPY_VERSION} (pip, without its jar download)", lambda: install_kclpy(root)),
        (f"grpcurl {GRPCURL_VERSION} (go install)", lambda: install_grpcurl(root)),
        ("promtool (unpacked from Debian's prometheus)", lambda: _optional_promtool(root)),
    ]
    for label, step in steps:
        started = time.monotonic()
        try:
            step()
        except InstallError as e:
            print(f"tagbus.install: {label}: {e}", file=sys.stderr)
            return 1
        print(f"tagbus.install: {label}: ok ({time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
