"""The Dockerfiles and .dockerignore, checked without a Docker engine.

No engine can run here, so the images have to be right by construction. Besides static checks (the
console script exists, the package name matches, non-root, health check on /healthz, the lock is used),
the build stage of every Dockerfile is *executed*: its COPY instructions are replayed from the build
context that .dockerignore leaves, its ``uv sync`` commands run as written (offline, from uv's cache),
with /src and /app mapped to a temporary directory. Then /src is deleted, as the runtime stage does
not have it, and the console script's entry point is imported from the resulting venv. An image whose
lock, workspace layout, ignore file or package metadata is broken fails here instead of in CI.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# image -> (Dockerfile, distribution, console script, port, health path)
IMAGES: dict[str, tuple[str, str, str, int, str]] = {
    "ingress": ("services/ingress/Dockerfile", "voicebus-ingress", "voicebus-ingress", 8080, "/healthz"),
    "config": ("services/config/Dockerfile", "voicebus-config", "voicebus-config", 8081, "/healthz"),
    "agent-runner": ("services/agent-runner/Dockerfile", "voicebus-agent-runner", "voicebus-agent-runner", 8082,
                     "/healthz"),
    "call-control": ("services/call-control/Dockerfile", "voicebus-call-control", "voicebus-call-control", 8083,
                     "/healthz"),
    "simulator": ("simulator/Dockerfile", "voicebus-simulator", "voicebus-sim", 8090, "/_sim/healthz"),
}
SERVICE_IMAGES = ["ingress", "config", "agent-runner", "call-control"]
PORT_ENV = {"ingress": "VOICEBUS_INGRESS_PORT", "config": "VOICEBUS_CONFIG_PORT",
            "agent-runner": "VOICEBUS_RUNNER_PORT", "call-control": "VOICEBUS_CALL_CONTROL_PORT"}


# ------------------------------------------------------------------------------- Dockerfile model ----
@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages. Comment lines are dropped even inside continuations, as Docker does."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, f"cannot parse FROM {rest}"
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return args, stages


def dockerfile(image: str) -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile((REPO / IMAGES[image][0]).read_text())


def exec_form(args: str) -> list[str]:
    import json

    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


def parse_env(args: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"use ENV KEY=VALUE, not the legacy form: {args}"
        env[key] = value
    return env


# ---------------------------------------------------------------------------------- .dockerignore ----
def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go filepath.Match plus ``**`` for any number of directories)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1:j].replace("!", "^", 1) + "]", j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((negate, _glob_to_regex(pattern)))

    def excluded(self, rel: str) -> bool:
        """Last matching rule wins; a rule matching a parent directory matches everything below it."""
        parts = rel.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negate, rx in self.rules:
            if any(rx.match(p) for p in prefixes):
                result = not negate
        return result

    @property
    def has_exceptions(self) -> bool:
        return any(neg for neg, _ in self.rules)


def dockerignore() -> DockerIgnore:
    return DockerIgnore((REPO / ".dockerignore").read_text())


def build_context() -> set[str]:
    """Files the Docker CLI would send as context (repository root filtered by .dockerignore)."""
    ignore = dockerignore()
    files: set[str] = set()
    for root, dirs, names in os.walk(REPO):
        rel_root = os.path.relpath(root, REPO)
        rel_root = "" if rel_root == "." else rel_root + "/"
        if not ignore.has_exceptions:  # safe to prune: nothing below an excluded dir can come back
            dirs[:] = [d for d in dirs if not ignore.excluded(rel_root + d)]
        files.update(rel_root + n for n in names if not ignore.excluded(rel_root + n))
    return files


@pytest.fixture(scope="module")
def context() -> set[str]:
    return build_context()


# ------------------------------------------------------------------------------- workspace facts ----
def workspace_members() -> list[str]:
    root = tomllib.loads((REPO / "pyproject.toml").read_text())
    members: list[str] = []
    for pattern in root["tool"]["uv"]["workspace"]["members"]:
        members.extend(str(p.parent.relative_to(REPO)) for p in sorted(REPO.glob(f"{pattern}/pyproject.toml")))
    return sorted(members)


def pyproject(member: str) -> dict[str, Any]:
    return tomllib.loads((REPO / member / "pyproject.toml").read_text())


# ------------------------------------------------------------------------------------ static tests ----
def test_dockerignore_semantics() -> None:
    """The matcher mirrors Docker's rules, so the context tests below mean what they say."""
    ig = DockerIgnore("**/__pycache__\n.venv\n*.md\n!README.md\nlibs/**/tests\n")
    assert ig.excluded("a/b/__pycache__/x.pyc") and ig.excluded("__pycache__")
    assert ig.excluded(".venv/bin/python") and not ig.excluded("src/.venv2")
    assert ig.excluded("CHANGES.md") and not ig.excluded("README.md") and not ig.excluded("docs/x.md")
    assert ig.excluded("libs/bus/tests/test_x.py") and not ig.excluded("services/x/tests/t.py")


def test_context_has_what_uv_needs_and_nothing_secret(context: set[str]) -> None:
    assert {"pyproject.toml", "uv.lock"} <= context
    for member in workspace_members():
        assert f"{member}/pyproject.toml" in context, f"{member} missing from the build context"
        assert any(f.startswith(f"{member}/src/") and f.endswith(".py") for f in context), f"{member}/src"
    forbidden = re.compile(r"(^|/)(\.git|\.venv|\.tools|\.voicebus|__pycache__)(/|$)|(^|/)\.env$|\.env$|\.key$")
    leaked = sorted(f for f in context if forbidden.search(f))
    assert not leaked, f"the build context would include: {leaked[:10]}"
    ig = dockerignore()
    for secret in ("voicebus.env", ".env", "services/config/.env", ".voicebus/secret.key", "x/.voicebus/voicebus.db"):
        assert ig.excluded(secret), f"{secret} would be sent to the builder"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_names_the_package_and_its_console_script(image: str) -> None:
    path, dist, script, _port, _health = IMAGES[image]
    member = str(Path(path).parent)
    project = pyproject(member)["project"]
    assert project["name"] == dist
    assert script in project.get("scripts", {}), f"{member}/pyproject.toml declares no console script {script}"
    _args, stages = dockerfile(image)
    runtime = stages[-1]
    assert exec_form(runtime.all("ENTRYPOINT")[-1])[0] == script, "ENTRYPOINT must be the console script"
    syncs = [r for r in stages[0].all("RUN") if "uv sync" in r]
    assert syncs and all(f"--package {dist}" in r for r in syncs), f"uv sync must target --package {dist}"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_structure(image: str) -> None:
    path, _dist, _script, port, health = IMAGES[image]
    args, stages = dockerfile(image)
    assert len(stages) == 2, "expected a build stage and a runtime stage"
    build, runtime = stages
    assert build.base == runtime.base == "${PYTHON_IMAGE}" and args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    # uv comes from PyPI, pinned; no other registry than PyPI/Debian at build time
    assert any(re.fullmatch(r"pip install uv==\d+\.\d+\.\d+", r) for r in build.all("RUN")), "pin uv from PyPI"
    text = (REPO / path).read_text()
    assert "ghcr.io" not in text and "COPY --from=ghcr" not in text
    syncs = [r for r in build.all("RUN") if "uv sync" in r]
    assert any("--no-install-workspace" in r for r in syncs), "keep a dependencies-only layer for caching"
    final = syncs[-1]
    for flag in ("--frozen", "--no-dev", "--no-editable"):
        assert flag in final, f"the final uv sync needs {flag}"
    env = {k: v for e in build.all("ENV") for k, v in parse_env(e).items()}
    assert env["UV_PROJECT_ENVIRONMENT"] == "/app/.venv"
    # runtime: the venv only, as an unprivileged user, listening on all interfaces
    assert runtime.all("COPY") == ["--from=build /app/.venv /app/.venv"]
    user = runtime.all("USER")[-1]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"USER must be a numeric non-root uid:gid, not {user}"
    renv = {k: v for e in runtime.all("ENV") for k, v in parse_env(e).items()}
    assert renv["PATH"].startswith("/app/.venv/bin:")
    assert renv["VOICEBUS_HTTP_HOST"] == "0.0.0.0"
    if image in PORT_ENV:
        assert renv[PORT_ENV[image]] == str(port)
    assert runtime.all("EXPOSE") == [str(port)]
    health_args = runtime.all("HEALTHCHECK")[-1]
    cmd = exec_form(health_args.split("CMD", 1)[1].strip())
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], "HEALTHCHECK", "exec")  # a syntax error would mark every container unhealthy
    assert f"127.0.0.1:%s{health}" in cmd[2] or f"127.0.0.1:{port}{health}" in cmd[2]
    assert f"'{port}'" in cmd[2] or f":{port}/" in cmd[2], "health check must default to the service port"


def test_dockerfiles_copy_every_workspace_member_manifest() -> None:
    """uv reads the whole workspace to use the lock; a member added later must be added to every image."""
    members = workspace_members()
    for image in IMAGES:
        _args, (build, _runtime) = dockerfile(image)
        copied = sorted(
            str(Path(c.split()[0]).parent) for c in build.all("COPY") if c.split()[0].endswith("/pyproject.toml")
        )
        assert copied == members, f"{image}: pyproject.toml COPY lines {copied} != workspace members {members}"


def test_dockerfiles_agree_on_base_image_and_uv_version() -> None:
    seen = {image: (dockerfile(image)[0]["PYTHON_IMAGE"],
                     next(r for r in dockerfile(image)[1][0].all("RUN") if r.startswith("pip install uv=")))
            for image in IMAGES}
    assert len(set(seen.values())) == 1, f"images disagree on base or uv pin: {seen}"


def test_every_copy_source_is_in_the_context(context: set[str]) -> None:
    for image in IMAGES:
        _args, (build, _runtime) = dockerfile(image)
        for copy_args in build.all("COPY"):
            *sources, _dest = shlex.split(copy_args)
            for src in sources:
                assert src in context or any(f.startswith(src.rstrip("/") + "/") for f in context), (
                    f"{image}: COPY {src} is not in the build context (.dockerignore?)"
                )


# ------------------------------------------------------------------------------- emulated builds ----
def _uv() -> str | None:
    for candidate in (os.environ.get("UV"), shutil.which("uv"), str(REPO / ".tools" / "bin" / "uv")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _copy_from_context(context: set[str], src: str, dest: Path, into_dir: bool) -> None:
    src = src.rstrip("/")
    if src in context:  # a file
        target = dest / Path(src).name if into_dir else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / src, target)
        return
    below = [f for f in context if f.startswith(src + "/")]
    assert below, f"COPY {src}: nothing in the build context"
    for f in below:  # a directory: its contents go into dest
        target = dest / f[len(src) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, target)


def _emulated_env(build_env: dict[str, str], mapping: dict[str, Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV", "PYTHON"))}
    for key, value in build_env.items():
        env[key] = _map_path(value, mapping)
    env.update(
        UV_PYTHON=sys.executable,  # same interpreter line (3.11) as the python:3.11 base image
        UV_OFFLINE="1",            # tests are offline: everything must come from uv's cache
        UV_LINK_MODE="hardlink" if os.name == "posix" else "copy",  # speed only; contents are identical
        UV_COMPILE_BYTECODE="0",   # speed only
        UV_NO_PROGRESS="1",
    )
    return env


def _map_path(value: str, mapping: dict[str, Path]) -> str:
    for prefix, real in mapping.items():
        if value == prefix or value.startswith(prefix + "/"):
            return str(real) + value[len(prefix):]
    return value


def _run_build_stage(image: str, root: Path, context: set[str], uv: str) -> Path:
    """Replay the build stage in ``root``; returns the venv (the /app/.venv the runtime stage copies)."""
    _args, (build, _runtime) = dockerfile(image)
    mapping = {"/app": root / "app", "/src": root / "src"}
    workdir = root
    build_env: dict[str, str] = {}
    for ins in build.instructions:
        if ins.keyword == "ENV":
            build_env.update(parse_env(ins.args))
        elif ins.keyword == "WORKDIR":
            workdir = Path(_map_path(ins.args, mapping))
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            *sources, dest = shlex.split(ins.args)
            assert not any(s.startswith("--") for s in sources), f"unsupported COPY flag in build stage: {ins.args}"
            target = workdir / dest if not dest.startswith("/") else Path(_map_path(dest, mapping))
            for src in sources:
                _copy_from_context(context, src, target, into_dir=dest.endswith("/") or len(sources) > 1)
        elif ins.keyword == "RUN":
            line = re.sub(r"^(--mount=\S+\s+)+", "", ins.args)
            env = _emulated_env(build_env, mapping)
            for command in " ".join(shlex.split(line, posix=False)).split(" && "):
                argv = [_map_path(a, mapping) for a in shlex.split(command)]
                if argv[:2] == ["pip", "install"]:
                    assert re.fullmatch(r"uv==[\d.]+", argv[2]), f"unexpected pip install: {argv}"
                    continue  # the uv running this test stands in for the pinned one
                if argv[:2] == ["test", "-x"]:
                    assert os.access(argv[2], os.X_OK), f"{image}: {argv[2]} is not executable"
                    continue
                if argv[0] == "uv":
                    argv[0] = uv
                elif not argv[0].endswith("/python"):
                    pytest.fail(f"{image}: the emulator does not know how to run {command!r}; extend it")
                proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
                                      check=False)
                if proc.returncode and argv[0] == uv and "offline" in proc.stderr.lower():
                    pytest.skip(f"uv's cache lacks a package needed offline (run `uv sync` first): {proc.stderr}")
                assert proc.returncode == 0, f"{image}: `{command}` failed:\n{proc.stdout}\n{proc.stderr}"
        elif ins.keyword not in {"ARG", "LABEL"}:
            pytest.fail(f"{image}: the emulator does not handle {ins.keyword} in the build stage; extend it")
    venv = Path(_map_path(build_env["UV_PROJECT_ENVIRONMENT"], mapping))
    assert (venv / "bin" / "python").exists(), f"{image}: no venv at {venv}"
    return venv


@pytest.fixture(scope="module")
def built_images(tmp_path_factory: pytest.TempPathFactory, context: set[str]) -> Iterator[Callable[[str], Path]]:
    """Build each image's venv once per module, on demand (the smoke test reuses it)."""
    cache: dict[str, Path] = {}

    def build(image: str) -> Path:
        if image not in cache:
            uv = _uv()
            if uv is None:
                pytest.skip("uv is not available")
            root = tmp_path_factory.mktemp(f"image-{image}")
            venv = _run_build_stage(image, root, context, uv)
            shutil.rmtree(root / "src")  # the runtime stage copies only the venv
            cache[image] = venv
        return cache[image]

    yield build


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "UV"))}


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_build_stage_produces_a_self_contained_venv(image: str, built_images: Callable[[str], Path]) -> None:
    _path, dist, script, _port, _health = IMAGES[image]
    venv = built_images(image)
    assert (venv / "bin" / script).is_file(), f"{image}: console script {script} missing"
    probe = (
        "import importlib.metadata as m, json\n"
        f"d = m.distribution({dist!r})\n"
        "info = json.loads(d.read_text('direct_url.json') or '{}').get('dir_info', {})\n"
        "assert not info.get('editable'), 'installed editable: the venv would need /src at run time'\n"
        f"ep = next(e for e in m.entry_points(group='console_scripts') if e.name == {script!r})\n"
        "fn = ep.load()\n"
        "assert callable(fn)\n"
        "print(ep.value)\n"
    )
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=venv.parent, env=_clean_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{image}: entry point {script} does not load from the image venv:\n{proc.stderr}"
    expected = pyproject(str(Path(IMAGES[image][0]).parent))["project"]["scripts"][script]
    assert proc.stdout.strip() == expected
    site = next((venv / "lib").glob("python3*/site-packages"))
    leaks = [p.name for p in site.glob("*.pth") if "/src" in p.read_text()]
    assert not leaks, f"{image}: .pth files point at the source tree, gone at run time: {leaks}"


# ---------------------------------------------------------------------------------- smoke start ----
STARTUP_DEADLINE_S = 90.0  # the runner loads its voice and VAD models before it answers
STOP_DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def smoke_database_url(pg_databases: Any) -> str:
    """A database of its own, so the config image migrates an empty schema like a first install."""
    return pg_databases.create("vb_deploy")


def _configmap() -> dict[str, str]:
    import yaml

    (doc,) = [d for d in yaml.safe_load_all((REPO / "deploy/k8s/configmap.yaml").read_text()) if d]
    return {k: str(v) for k, v in doc["data"].items()}


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def _wait_for_status(proc: subprocess.Popen[bytes], url: str, logs: Path, deadline_s: float) -> None:
    """Wait for a 200 from ``url``, failing at once (with the logs) if the process exits first."""
    deadline = time.monotonic() + deadline_s
    status = 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before {url} answered:\n{logs.read_text()[-4000:]}")
        status = _get(url)
        if status == 200:
            return
        time.sleep(0.1)  # polling interval of a readiness wait, not synchronisation by sleeping
    pytest.fail(f"{url} answered {status or 'nothing'} within {deadline_s}s:\n{logs.read_text()[-4000:]}")


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_starts_passes_its_healthcheck_and_stops_on_sigterm(
    image: str, built_images: Callable[[str], Path], tmp_path: Path, nats_url: str, redis_url: str,
    smoke_database_url: str, subject_prefix: str,
) -> None:
    """Run the image's ENTRYPOINT + CMD from its venv, configured by the Kubernetes ConfigMap.

    Proves what a manifest test cannot: the services honour the ConfigMap's variable names, listen on
    the port the probes use, answer /healthz (and /readyz once NATS, Redis and PostgreSQL are reached),
    pass the Dockerfile's own HEALTHCHECK, exit cleanly on SIGTERM and keep the secret key out of logs.
    """
    _path, _dist, _script, default_port, health = IMAGES[image]
    venv = built_images(image)
    _args, stages = dockerfile(image)
    runtime = stages[-1]
    port = _free_port()
    scratch = tmp_path / "tmp"  # the pod's /tmp emptyDir
    workdir = tmp_path / "workdir"  # WORKDIR /var/lib/voicebus
    scratch.mkdir()
    workdir.mkdir()
    mapping = {"/app": venv.parent, "/tmp": scratch}
    secret_key = base64.urlsafe_b64encode(os.urandom(32)).decode()

    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8"}
    for e in runtime.all("ENV"):
        env.update({k: _map_path(v.replace("${PATH}", env["PATH"]), mapping) for k, v in parse_env(e).items()})
    env.update(_configmap())
    env.update(
        NATS_URL=nats_url, REDIS_URL=redis_url, VOICEBUS_SUBJECT_PREFIX=subject_prefix,
        VOICEBUS_HTTP_HOST="127.0.0.1", DATABASE_URL=smoke_database_url, VOICEBUS_SECRET_KEY=secret_key,
    )
    if image in PORT_ENV:
        env[PORT_ENV[image]] = str(port)
    argv = exec_form(runtime.all("ENTRYPOINT")[-1]) + (exec_form(runtime.all("CMD")[-1]) if runtime.all("CMD") else [])
    argv = [str(port) if a == str(default_port) else "127.0.0.1" if a == "0.0.0.0" else a for a in argv]
    argv[0] = str(venv / "bin" / argv[0])

    logs = tmp_path / "service.log"
    with logs.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for_status(proc, f"http://127.0.0.1:{port}{health}", logs, STARTUP_DEADLINE_S)
            health_cmd = exec_form(runtime.all("HEALTHCHECK")[-1].split("CMD", 1)[1].strip())
            # an image without a port variable (the simulator) hard-codes its port in the check
            health_cmd = [c.replace(f":{default_port}/", f":{port}/") for c in health_cmd]
            hc = subprocess.run([str(venv / "bin" / "python"), *health_cmd[1:]], env=env, capture_output=True,
                                text=True, timeout=30, check=False)
            assert hc.returncode == 0, f"the Dockerfile HEALTHCHECK fails against a live {image}: {hc.stderr}"
            if image in PORT_ENV:
                _wait_for_status(proc, f"http://127.0.0.1:{port}/readyz", logs, STARTUP_DEADLINE_S)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=STOP_DEADLINE_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = logs.read_text(errors="replace")
    assert code == 0, f"{image} did not exit cleanly on SIGTERM (exit {code}):\n{output[-4000:]}"
    assert secret_key not in output, f"{image} logged VOICEBUS_SECRET_KEY"
    # The pods run with a read-only root filesystem: only /tmp (an emptyDir) may be written to.
    written = [str(p.relative_to(tmp_path)) for p in (*workdir.rglob("*"), tmp_path / "home") if p.exists()]
    assert not written, f"{image} wrote outside /tmp, which fails on a read-only root filesystem: {written}"


def test_config_image_refuses_the_placeholder_secret_key(
    built_images: Callable[[str], Path], tmp_path: Path, nats_url: str, redis_url: str, subject_prefix: str,
) -> None:
    """secret.yaml promises that deploying its placeholder fails closed instead of encrypting with it."""
    import yaml

    (secret,) = [d for d in yaml.safe_load_all((REPO / "deploy/k8s/secret.yaml").read_text()) if d]
    placeholder = secret["stringData"]["VOICEBUS_SECRET_KEY"]
    venv = built_images("config")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8", **_configmap(),
           "NATS_URL": nats_url, "REDIS_URL": redis_url, "VOICEBUS_SUBJECT_PREFIX": subject_prefix,
           "VOICEBUS_HTTP_HOST": "127.0.0.1", "VOICEBUS_CONFIG_PORT": str(_free_port()),
           "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'voicebus.db'}", "VOICEBUS_SECRET_KEY": placeholder}
    proc = subprocess.run([str(venv / "bin" / "voicebus-config"), "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=STOP_DEADLINE_S, check=False)
    assert proc.returncode != 0, "config started with the placeholder key from secret.yaml"
    assert "VOICEBUS_SECRET_KEY" in proc.stdout + proc.stderr, "the refusal must say which setting is wrong"
