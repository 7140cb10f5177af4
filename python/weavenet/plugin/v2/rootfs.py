"""The plugin's root filesystem: a Python runtime, weavenet with its compiled core, and iptables.

Nothing is downloaded: everything comes from this host. The runtime is the interpreter running
this command (so weavenet's compiled core and its dependencies match it), its standard library
minus what a router never imports (tests, tkinter, idle, ...), and iptables in the backend this
host uses (the binary plus every xtables extension: Docker's own rules need most of them); each
binary's shared libraries are found with ldd and kept at their host paths (RUNPATHs stay valid).
The runtime is cached per host under /var/cache/weavenet, keyed by the interpreter and iptables
it was made from, and hard-linked into each build; weavenet and its dependencies are copied fresh
every time (they change with the code). Layout inside:

    /usr/local/bin/python3            the interpreter (run as `python3 -I -S -u`)
    /usr/local/lib/python3.X/         its standard library (+ lib-dynload)
    /usr/local/lib/weavenet/          weavenet (+ _fastdp), its dependencies, their dist-info
    /usr/local/bin/weavenet-plugin    the launcher: puts the above on sys.path, runs the entry point
    /usr/sbin/iptables -> xtables-*-multi, and the xtables extensions at their host path

Blocking file work; run from the CLI, never from the router.
"""

from __future__ import annotations

import compileall
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from weavenet.plugin.v2.config_json import LAUNCHER, PYTHON, SITE_DIR

log = logging.getLogger(__name__)

CACHE_DIR = Path("/var/cache/weavenet")
RUNTIME_FORMAT = 1  # bump when the runtime's layout changes: old caches are then ignored
STDLIB_SKIP = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "site-packages",
        "dist-packages",
        "__phello__",
    }
)
TEST_DIRS = frozenset({"tests", "_tests", "test"})
DYNLOAD_SKIP = re.compile(r"^(_tkinter|_test|_ctypes_test|xxlimited|xxsubtype|_xxtestfuzz|_xxsubinterpreters)")
XTABLES_LINKS = ("iptables", "iptables-save", "iptables-restore")

LAUNCHER_SOURCE = f"""\
# weavenet managed plugin launcher: weavenet and its dependencies live apart from the stdlib.
import signal
import sys
# PID 1 ignores SIGTERM without a handler: install one before the imports that take time.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
sys.path.insert(0, {SITE_DIR!r})
from weavenet.plugin.v2.entrypoint import main
sys.exit(main())
"""


class RootfsError(Exception):
    """The rootfs cannot be made on this host (a tool or file is missing); one line."""


# --- what the runtime is made of ---


def interpreter() -> Path:
    """The real interpreter binary behind this process (through venv symlinks)."""
    return Path(os.path.realpath(sys.executable))


def stdlib_dir() -> Path:
    return Path(sysconfig.get_path("stdlib"))


def dynload_dir() -> Path:
    dest = sysconfig.get_config_var("DESTSHARED")
    if dest and Path(dest).is_dir():
        return Path(dest)
    return stdlib_dir() / "lib-dynload"


def iptables_binary() -> Path:
    found = shutil.which("iptables") or next(
        (p for p in ("/usr/sbin/iptables", "/sbin/iptables") if os.path.exists(p)), None
    )
    if found is None:
        raise RootfsError("iptables not found on this host: install it (Debian package iptables)")
    return Path(os.path.realpath(found))


def xtables_dir() -> Path | None:
    """Where this host's iptables keeps its extensions (libxt_*.so)."""
    env = os.environ.get("XTABLES_LIBDIR")
    candidates = [Path(env)] if env else []
    candidates += [*sorted(Path("/usr/lib").glob("*/xtables")), Path("/usr/lib/xtables"), Path("/lib/xtables")]
    return next((c for c in candidates if c.is_dir() and any(c.glob("libxt_*.so"))), None)


def runtime_key() -> str:
    """Identifies a runtime: the interpreter, its stdlib and iptables, by path and modification."""
    parts = [f"format={RUNTIME_FORMAT}", sys.version]
    for path in (interpreter(), stdlib_dir() / "os.py", dynload_dir(), iptables_binary()):
        stat = path.stat()
        parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- copying ---


def _place(source: Path, target: Path) -> None:
    """Hard-link `source` to `target` (same filesystem), else copy it with its times."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _copy_tree(source: Path, target: Path, *, skip_dirs: Iterable[str] = ()) -> int:
    """Copy (hard-link) a tree of regular files; symlinks are kept as symlinks. Returns files placed."""
    skip = set(skip_dirs)
    count = 0
    for root, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if d not in skip]
        rel = Path(root).relative_to(source)
        for name in files:
            src = Path(root) / name
            dst = target / rel / name
            if src.is_symlink():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(os.readlink(src))
            else:
                _place(src, dst)
            count += 1
    return count


def shared_libraries(binaries: Iterable[Path]) -> set[Path]:
    """Every shared library the binaries load (ldd), including the dynamic loader."""
    paths = [str(b) for b in binaries]
    if not paths:
        return set()
    if shutil.which("ldd") is None:
        raise RootfsError("ldd not found on this host (Debian package libc-bin)")
    found: set[Path] = set()
    for start in range(0, len(paths), 200):
        result = subprocess.run(["ldd", *paths[start : start + 200]], capture_output=True, text=True)
        for line in result.stdout.splitlines():
            line = line.strip()
            if "not found" in line:
                raise RootfsError(f"a library this host's binaries need is missing: {line}")
            match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if match:
                found.add(Path(match.group(1)))
    return found


def _strip(path: Path) -> None:
    """Drop debug symbols from a copied library (libpython: 23 MB → 6 MB); best effort."""
    if shutil.which("strip") is not None:
        subprocess.run(["strip", "--strip-unneeded", str(path)], capture_output=True)


def _host_path(root: Path, path: Path) -> Path:
    return root / str(path).lstrip("/")


# --- the cached runtime ---


def build_runtime(target: Path) -> None:
    """Make the runtime (interpreter, stdlib, iptables, their libraries) in `target`."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    lib = target / "usr/local/lib" / version
    python = _host_path(target, Path(PYTHON))
    python.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(interpreter(), python)
    (python.parent / version).symlink_to("python3")
    _copy_tree(stdlib_dir(), lib, skip_dirs=STDLIB_SKIP | {"lib-dynload"} | _config_dirs(stdlib_dir()))
    _drop_optimised_bytecode(lib)
    dynload = lib / "lib-dynload"
    dynload.mkdir(parents=True, exist_ok=True)
    extensions = [p for p in sorted(dynload_dir().glob("*.so")) if not DYNLOAD_SKIP.match(p.name)]
    for ext in extensions:
        shutil.copy2(ext, dynload / ext.name)
    iptables = iptables_binary()
    sbin = target / "usr/sbin"
    sbin.mkdir(parents=True, exist_ok=True)
    shutil.copy2(iptables, sbin / iptables.name)
    for link in XTABLES_LINKS:
        (sbin / link).symlink_to(iptables.name)
    xtables = xtables_dir()
    modules: list[Path] = []
    if xtables is not None:
        modules = sorted(xtables.glob("*.so"))
        for module in modules:
            _place_copy(module, _host_path(target, module))
    binaries = [interpreter(), *extensions, iptables, *modules]
    for library in sorted(shared_libraries(binaries)):
        copied = _host_path(target, library)
        if copied.exists():
            continue
        copied.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(library), copied)
        if ".so" in library.name and "ld-linux" not in library.name:
            _strip(copied)
    for ext in dynload.glob("*.so"):
        _strip(ext)
    for sub in ("proc", "sys", "dev", "tmp", "run", "etc", "var/lib/weavenet", "var/run"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    (target / "tmp").chmod(0o1777)


def _place_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def _config_dirs(stdlib: Path) -> set[str]:
    return {p.name for p in stdlib.glob("config-*") if p.is_dir()}


def _drop_optimised_bytecode(lib: Path) -> None:
    for pyc in lib.rglob("*.opt-[12].pyc"):
        pyc.unlink()


def cached_runtime(cache_dir: Path = CACHE_DIR) -> Path:
    """The runtime for this host, built once into the cache (atomically: a rename) and reused."""
    ready = cache_dir / f"runtime-{runtime_key()}"
    if ready.is_dir():
        return ready
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = Path(tempfile.mkdtemp(prefix="runtime-", suffix=".tmp", dir=cache_dir))
    try:
        build_runtime(staging)
        try:
            staging.rename(ready)
        except OSError:  # another build won the race: use theirs
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in cache_dir.glob("runtime-*"):
        if old != ready and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)
    return ready


# --- weavenet and its dependencies ---


def _requirement_names(dist: importlib.metadata.Distribution) -> Iterator[str]:
    for requirement in dist.requires or []:
        name, _, marker = requirement.partition(";")
        if "extra" in marker:
            continue
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", name)
        if match:
            yield match.group(1)


def dependency_closure(root: str = "weavenet") -> list[importlib.metadata.Distribution]:
    """The installed distributions weavenet needs at run time (not its extras), weavenet excluded."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    pending = list(_requirement_names(importlib.metadata.distribution(root)))
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement for other Python versions (its marker), not installed here
        seen[key] = dist
        pending.extend(_requirement_names(dist))
    return [seen[k] for k in sorted(seen)]


def install_packages(site: Path) -> int:
    """weavenet (the package directory, with its compiled core), its dist-info, and its dependencies."""
    import weavenet

    package = Path(weavenet.__file__).parent
    if not any(package.glob("_fastdp*.so")):
        raise RootfsError(f"weavenet's compiled core (_fastdp*.so) is missing in {package}: build it first")
    count = _copy_tree(package, site / "weavenet", skip_dirs={"tests"})
    dist = importlib.metadata.distribution("weavenet")
    count += _copy_dist_info(dist, site)
    for dep in dependency_closure():
        for file in dep.files or []:
            source = Path(str(dep.locate_file(file)))
            if ".." in file.parts or not source.is_file():
                continue  # scripts and data outside site-packages
            if TEST_DIRS.intersection(file.parts):
                continue  # a dependency's own test suite
            _place(source, site / file)
            count += 1
    return count


def _copy_dist_info(dist: importlib.metadata.Distribution, site: Path) -> int:
    """The metadata `importlib.metadata.version("weavenet")` reads (editable installs have no RECORD'd package)."""
    path = getattr(dist, "_path", None)
    if path is None or not Path(path).is_dir():
        return 0
    return _copy_tree(Path(path), site / Path(path).name)


def write_launcher(root: Path) -> None:
    launcher = _host_path(root, Path(LAUNCHER))
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(LAUNCHER_SOURCE)
    launcher.chmod(0o755)


def make_rootfs(target: Path, *, cache_dir: Path = CACHE_DIR) -> None:
    """The full rootfs in `target` (which must not exist): the cached runtime plus weavenet."""
    runtime = cached_runtime(cache_dir)
    _copy_tree(runtime, target)
    _make_dirs(runtime, target)
    site = _host_path(target, Path(SITE_DIR))
    install_packages(site)
    # Bytecode now, not at every start (the stdlib's comes from the host's install already).
    compileall.compile_dir(site, quiet=1, workers=1)
    add_libraries(target, sorted(site.rglob("*.so")))  # the Rust core needs libgcc_s, for one
    write_launcher(target)


def add_libraries(root: Path, binaries: Iterable[Path]) -> None:
    """Copy the shared libraries `binaries` need that `root` does not have yet."""
    for library in sorted(shared_libraries(binaries)):
        copied = _host_path(root, library)
        if not copied.exists():
            _place_copy(Path(os.path.realpath(library)), copied)


def _make_dirs(runtime: Path, target: Path) -> None:
    """Empty directories (mount points) do not come with the files: make them, with their modes."""
    for root, dirs, _ in os.walk(runtime):
        for name in dirs:
            src = Path(root) / name
            dst = target / src.relative_to(runtime)
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copymode(src, dst)
