"""docker-compose.yml, checked offline: it parses, and its cross-references hold.

``docker compose config`` is not available here (no compose plugin, no engine), so the checks a user
would hit at ``up`` are made by reading the file: every build names an existing Dockerfile, every
``depends_on: service_healthy`` waits on a service that has a health check, the voicebus services get
the settings the Kubernetes ConfigMap defines (same names, so a typo shows up as a mismatch), the
secret key stays in the env file, and the runner's stop grace period outlasts its drain.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"

# compose service -> (Dockerfile, port env var, port, console script)
VOICEBUS = {
    "ingress": ("services/ingress/Dockerfile", "VOICEBUS_INGRESS_PORT", 8080, "voicebus-ingress"),
    "config": ("services/config/Dockerfile", "VOICEBUS_CONFIG_PORT", 8081, "voicebus-config"),
    "agent-runner": ("services/agent-runner/Dockerfile", "VOICEBUS_RUNNER_PORT", 8082, "voicebus-agent-runner"),
    "call-control": ("services/call-control/Dockerfile", "VOICEBUS_CALL_CONTROL_PORT", 8083, "voicebus-call-control"),
}
DATASTORES = ("nats", "redis", "postgres")
# Settings that are not in the ConfigMap on purpose (secrets, or compose-only wiring; the k8s pods
# build NATS_URL from the ConfigMap's NATS_SCHEME/NATS_ADDRESS and their own user).
NOT_IN_CONFIGMAP = {"DATABASE_URL", "VOICEBUS_SECRET_KEY", "NATS_URL"}
# compose service -> its NATS user and the .env variable with its password (deploy/k8s/nats-auth.conf)
NATS_USERS = {"ingress": ("ingress", "NATS_INGRESS_PASSWORD"), "config": ("config", "NATS_CONFIG_PASSWORD"),
              "call-control": ("call-control", "NATS_CALL_CONTROL_PASSWORD"),
              "agent-runner": ("agent-runner", "NATS_AGENT_RUNNER_PASSWORD")}
# Required (${VAR:?...}): a stand-in value per secret, so a test can see which secret lands where.
REQUIRED = {var: f"<{var}>" for _user, var in NATS_USERS.values()}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any) -> str:
    """Compose's ${VAR:-default} with an empty environment: what a user gets without a .env file."""
    def sub(m: re.Match[str]) -> str:
        op, arg = m.group(2), m.group(3)
        if op in (":-", "-"):
            return arg
        if op == ":?" and m.group(1) in REQUIRED:  # a secret from the git-ignored .env: fail loudly if unset
            assert arg.strip(), f"{m.group(0)}: say what to do when it is missing"
            return REQUIRED[m.group(1)]
        raise AssertionError(f"{m.group(0)} has no default: compose would fail or warn without it")

    return _VAR.sub(sub, str(value))


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of environment (merged with <<: *voicebus-env)"
    return {k: interpolate(v) for k, v in env.items()}


def configmap() -> dict[str, str]:
    (doc,) = [d for d in yaml.safe_load_all((REPO / "deploy/k8s/configmap.yaml").read_text()) if d]
    return doc["data"]


def duration_s(value: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", value):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    assert total > 0, f"cannot parse duration {value!r}"
    return total


def test_compose_parses_and_has_the_whole_stack() -> None:
    doc = compose()
    assert isinstance(doc, dict) and "version" not in doc, "the top-level version key is obsolete"
    have = set(doc["services"])
    assert {*DATASTORES, *VOICEBUS, "cloudonix-api"} <= have
    assert not [n for n in have if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", n)], "invalid service names"


@pytest.mark.parametrize("name", sorted(VOICEBUS))
def test_voicebus_service_builds_its_own_dockerfile(name: str) -> None:
    dockerfile, _port_env, _port, script = VOICEBUS[name]
    svc = services()[name]
    assert svc["build"]["context"] == ".", "the build context is the uv workspace root"
    assert svc["build"]["dockerfile"] == dockerfile
    assert (REPO / dockerfile).is_file()
    assert f'ENTRYPOINT ["{script}"]' in (REPO / dockerfile).read_text()
    assert interpolate(svc["image"]).startswith(f"voicebus/{name}:"), "tag images like the k8s manifests expect"


def test_nats_runs_jetstream_on_a_volume() -> None:
    nats = services()["nats"]
    assert nats["image"].startswith("nats:") and nats["image"] != "nats:latest"
    cmd = nats["command"]
    assert "--jetstream" in cmd or "-js" in cmd
    store = cmd[cmd.index("--store_dir") + 1] if "--store_dir" in cmd else cmd[cmd.index("-sd") + 1]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in nats["volumes"]}
    assert store in volumes and volumes[store] in compose()["volumes"], "JetStream must store on a named volume"
    assert "js-enabled-only" in " ".join(nats["healthcheck"]["test"]), "healthy only once JetStream is up"


def test_postgres_keeps_its_data_on_a_volume() -> None:
    pg = services()["postgres"]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in pg["volumes"]}
    assert volumes.get("/var/lib/postgresql/data") in compose()["volumes"]


@pytest.mark.parametrize("name", sorted(set(DATASTORES) | set(VOICEBUS) | {"cloudonix-api"}))
def test_every_service_has_a_healthcheck(name: str) -> None:
    check = services()[name].get("healthcheck")
    assert check and check["test"][0] in {"CMD", "CMD-SHELL"}, f"{name} has no usable healthcheck"


def test_depends_on_waits_for_healthy_existing_services() -> None:
    all_services = services()
    for name, svc in all_services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in all_services, f"{name} depends on unknown service {dep}"
            assert cond["condition"] == "service_healthy", f"{name} should wait for {dep} to be healthy"
            assert "healthcheck" in all_services[dep], f"{name} waits on {dep}, which has no healthcheck"
            assert not all_services[dep].get("profiles"), f"{name} depends on profile-only {dep}"
    assert set(all_services["config"]["depends_on"]) >= set(DATASTORES)
    for name in VOICEBUS:
        assert "nats" in all_services[name]["depends_on"], f"{name} needs NATS before it starts"


def test_published_ports() -> None:
    published = {n: s.get("ports", []) for n, s in services().items()}
    assert "8080:8080" in published["ingress"]
    assert "8081:8081" in published["config"]
    assert "8090:8090" in published["cloudonix-api"]
    for name in ("nats", "redis", "postgres", "agent-runner", "call-control"):
        assert not published[name], f"{name} has no business on the host network"


@pytest.mark.parametrize("name", sorted(VOICEBUS))
def test_voicebus_service_environment(name: str) -> None:
    _dockerfile, port_env, port, _script = VOICEBUS[name]
    svc = services()[name]
    env = env_of(svc)
    assert env[port_env] == str(port)
    assert env["VOICEBUS_HTTP_HOST"] == "0.0.0.0"
    user, password_var = NATS_USERS[name]
    assert env["NATS_URL"] == f"nats://{user}:<{password_var}>@nats:4222", "each service connects as its own user"
    assert env["OTEL_TRACES_EXPORTER"] in {"none", "console", "otlp"}
    cm = configmap()
    unknown = set(env) - set(cm) - NOT_IN_CONFIGMAP
    assert not unknown, f"{name} sets variables the ConfigMap does not know (typo?): {unknown}"
    # the same knob must mean the same thing in both deployments (URLs and hosts differ legitimately)
    for key in set(env) & set(cm) - {"NATS_URL", "REDIS_URL", "VOICEBUS_CARRIER_API_URLS", "VOICEBUS_PUBLIC_URL"}:
        assert env[key] == cm[key], f"{name}: {key}={env[key]!r} in compose but {cm[key]!r} in the ConfigMap"
    health = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in health, f"{name} healthcheck must ask /readyz on {port}"
    assert svc.get("read_only") is True and "/tmp" in svc.get("tmpfs", []), "same hardening as the pods"
    assert svc.get("cap_drop") == ["ALL"]


def test_config_wiring_and_secret_stays_in_the_env_file() -> None:
    all_services = services()
    cfg = all_services["config"]
    env = env_of(cfg)
    assert cfg.get("command") == ["serve"]
    assert re.fullmatch(r"postgresql\+asyncpg://voicebus:[^@]+@postgres:5432/voicebus", env["DATABASE_URL"])
    pg_env = env_of(all_services["postgres"])
    assert f":{pg_env['POSTGRES_PASSWORD']}@" in env["DATABASE_URL"], "config and postgres disagree on the password"
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    env_files = cfg.get("env_file")
    assert env_files == ["voicebus.env"], "VOICEBUS_SECRET_KEY comes from the voicebus.env file"
    for name, svc in all_services.items():
        assert "VOICEBUS_SECRET_KEY" not in svc.get("environment", {}), f"{name}: secret inline in compose"
        if name != "config":
            assert "env_file" not in svc, f"only config may read the secrets file ({name})"
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "voicebus.env" in ignored, "the secrets file must never be committed"


def test_runner_and_ingress_stop_grace_outlasts_the_drain() -> None:
    all_services = services()
    drain = float(env_of(all_services["agent-runner"])["VOICEBUS_RUNNER_DRAIN_TIMEOUT_S"])
    for name in ("agent-runner", "ingress"):
        grace = duration_s(all_services[name]["stop_grace_period"])
        assert grace > drain, f"{name}: stop_grace_period {grace}s <= drain {drain}s; docker would kill live calls"


def test_sim_profile_runs_the_cloudonix_stand_in() -> None:
    sim = services()["cloudonix-api"]
    assert sim["profiles"] == ["sim"], "the stand-in must not start unless asked for"
    assert sim["build"]["dockerfile"] == "simulator/Dockerfile" and (REPO / "simulator/Dockerfile").is_file()
    cmd = sim["command"]
    assert cmd[0] == "cloudonix-api" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "8090"
    # call-control reaches the stand-in when the user points it there; the default stays the real API
    cc = env_of(services()["call-control"])
    assert cc["VOICEBUS_CARRIER_API_URLS"] == ""
    assert "${VOICEBUS_CARRIER_API_URLS" in str(services()["call-control"]["environment"]["VOICEBUS_CARRIER_API_URLS"])
    assert "VOICEBUS_CARRIER_API_URLS=cloudonix=http://cloudonix-api:8090" in COMPOSE.read_text()


def test_nats_runs_with_the_generated_users_and_only_it_sees_every_password() -> None:
    """The same permission file as Kubernetes; passwords only from .env, each service gets only its own."""
    all_services = services()
    nats = all_services["nats"]
    cmd = nats["command"]
    conf = cmd[cmd.index("--config") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in nats["volumes"]}
    assert mounts[conf] == "./deploy/k8s/nats-auth.conf" and (REPO / "deploy/k8s/nats-auth.conf").is_file()
    assert env_of(nats) == {var: f"<{var}>" for var in REQUIRED}
    auth = (REPO / "deploy/k8s/nats-auth.conf").read_text()
    for name, (user, var) in NATS_USERS.items():
        assert f'user: "{user}"\n      password: ${var}\n' in auth, f"{user} is not a user of nats-auth.conf"
        others = [v for v in REQUIRED if v != var]
        leaked = [v for v in others if f"<{v}>" in str(env_of(all_services[name]))]
        assert not leaked, f"{name} sees other services' NATS passwords: {leaked}"
    # The header's one-liner (as in docs/deployment.md) writes every password, URL-safe (it sits in NATS_URL).
    (line,) = [x for x in COMPOSE.read_text().splitlines() if x.startswith("#") and ">> .env" in x and "NATS_" in x]
    code = re.search(r'python3 -c "(.*)" >> \.env', line)
    assert code, line
    out = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True, text=True, check=True).stdout
    written = dict(x.split("=", 1) for x in out.splitlines())
    assert set(written) == set(REQUIRED) and all(re.fullmatch(r"[0-9a-f]{48}", v) for v in written.values())
    assert ".env" in (REPO / ".gitignore").read_text().split(), "the passwords file must be git-ignored"
