"""NATS users and permissions (deploy/k8s/nats-auth.conf): each service may use exactly the subjects it needs.

Offline: the committed file is what ``deploy/nats_permissions.py`` renders for prefix ``vb``; each
service's grants cover every subject its code uses (named here through ``Subjects`` and the services'
own bucket and consumer names, not copied strings) and every grant is used by something, with no
cross-service leaks (only call-control may ask for carrier credentials, nobody may publish to inboxes).
Live: the file runs in a real nats-server, each service's real JetStream and request-reply operations
pass under its user, and subjects outside its grants are refused by the server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import kubernetes_validate
import nats
import nats.errors
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import BaseModel

from voicebus.bus import subjects as sj
from voicebus.bus.events import checkpoint_store, claims_store, ensure_events_stream, kv_bucket
from voicebus.bus.intents import INTENTS_CONSUMER, ensure_intents_stream, publish_hangup_intent
from voicebus.bus.messages import HangupRequest
from voicebus.bus.rpc import BusError, request, serve
from voicebus.bus.subjects import Subjects
from voicebus.call_control.legs import legs_bucket
from voicebus.call_control.service import actions_bucket, replay_bucket
from voicebus.cli.embedded import nats_server_binary
from voicebus.config.consumer import durable_name
from voicebus.ingress.pending import bucket_name as pending_bucket

from .test_manifests import K8S, KUBERNETES_VERSIONS, _one, kustomization

REPO = Path(__file__).resolve().parents[2]
AUTH_CONF = REPO / "deploy" / "k8s" / "nats-auth.conf"
S = Subjects("vb")
CALL = "c1"
KUBECTL = shutil.which("kubectl")


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nats_permissions", REPO / "deploy" / "nats_permissions.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["nats_permissions"] = mod
    spec.loader.exec_module(mod)
    return mod


GEN = _generator()


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: '*' one token, '>' one or more trailing tokens. A pattern matches a
    wildcard subject (a subscription) only if it covers all of it, as the server's permission check does."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i and all(t != ">" or i == len(p) - 1 for t in s[i:])
        if i >= len(s):
            return False
        if tok == "*":
            if s[i] == ">":
                return False
            continue
        if tok != s[i]:
            return False
    return len(p) == len(s)


def test_matcher() -> None:
    assert matches("vb.call.*.media.in", "vb.call.c1.media.in")
    assert not matches("vb.call.*.media.in", "vb.call.c1.media.out")
    assert matches("$KV.b.>", "$KV.b.k1") and not matches("$KV.b.>", "$KV.b")
    assert matches("vb.call.*.*.out", "vb.call.c1.*.out")
    assert not matches("vb.call.*.media.out", "vb.call.c1.*.out"), "a narrower grant does not cover a wildcard sub"
    assert not matches("vb.cfg.run.get", "vb.cfg.>")


# ---------------------------------------------------------------- what the code uses, per service ----
def _stream(name: str) -> set[str]:
    return {f"$JS.API.STREAM.INFO.{name}", f"$JS.API.STREAM.CREATE.{name}"}


def _kv(bucket: str, *, watch: bool = False) -> set[str]:
    stream = f"KV_{bucket}"
    used = {*_stream(stream), f"$KV.{bucket}.{CALL}", f"$JS.API.STREAM.MSG.GET.{stream}"}
    if watch:
        used |= {f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.INFO.{stream}.oc1", f"$JS.FC.{stream}.1.2"}
    return used


def _pull(stream: str, durable: str, filter_subject: str) -> set[str]:
    return {f"$JS.API.CONSUMER.INFO.{stream}.{durable}", f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.{filter_subject}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.1.1.1.1700000000.0"}


@dataclass
class Uses:
    publish: set[str] = field(default_factory=set)
    subscribe: set[str] = field(default_factory=set)
    answers_requests: bool = False


ENDED = {S.evt(sj.EVT_CALL_ENDED), S.evt(sj.EVT_CALL_FAILED)}
USES: dict[str, Uses] = {
    # services/ingress: media_pump, live_call, runner_link, bus.py (requests, events, intents), pending.py
    "ingress": Uses(
        publish={S.media_in(CALL), S.event_in(CALL), S.dispatch_offer,
                 *(S.cfg(a) for a in (sj.CFG_AGENT_RESOLVE, sj.CFG_QUOTA_ACQUIRE, sj.CFG_QUOTA_RENEW,
                                      sj.CFG_QUOTA_RELEASE, sj.CFG_RUN_CREATE, sj.CFG_RUN_UPDATE, sj.CFG_RUN_GET,
                                      sj.CFG_INBOUND_ROUTE, sj.CFG_TELEPHONY_MATCH)),
                 *(S.ctl(a) for a in (sj.CTL_LEG_REGISTER, sj.CTL_VERIFY, sj.CTL_HANGUP)),
                 S.evt(sj.EVT_CALL_STARTED), S.evt(sj.EVT_CALL_STATUS), *ENDED, S.intent(sj.INTENT_HANGUP),
                 *_stream(S.events_stream), *_stream(S.intents_stream), *_kv(pending_bucket(S))},
        subscribe={S.media_out(CALL).removesuffix("media.out") + "*.out", S.heartbeat(CALL), "_INBOX.abc.1"},
    ),
    # services/agent-runner: runner.py (offers, streams, KV), call.py, transport.py, claims.py (watch)
    "agent-runner": Uses(
        publish={S.media_out(CALL), S.event_out(CALL), S.heartbeat(CALL), S.evt(sj.EVT_CALL_ANSWERED), *ENDED,
                 S.intent(sj.INTENT_HANGUP), *_stream(S.events_stream), *_stream(S.intents_stream),
                 *_kv(S.checkpoint_bucket), *_kv(S.claims_bucket, watch=True)},
        subscribe={S.dispatch_offer, S.media_in(CALL), S.event_in(CALL), "_INBOX.abc.1"},
        answers_requests=True,
    ),
    # services/call-control: service.py (ctl.* API, KV claims with watch, legs keys()), intents.py (pull)
    "call-control": Uses(
        publish={S.cfg(sj.CFG_TELEPHONY_CREDENTIALS), S.cfg(sj.CFG_RUN_GET), S.evt(sj.EVT_CALL_HANGUP), *ENDED,
                 *_stream(S.events_stream), *_stream(S.intents_stream),
                 *_pull(S.intents_stream, INTENTS_CONSUMER, S.intent_all),
                 *_kv(actions_bucket(S), watch=True), *_kv(replay_bucket(S)), *_kv(legs_bucket(S), watch=True)},
        subscribe={*(S.ctl(a) for a in (sj.CTL_LEG_REGISTER, sj.CTL_VERIFY, sj.CTL_HANGUP, sj.CTL_INITIATE,
                                        sj.CTL_CALL_INFO, sj.CTL_BIND_NUMBER, sj.CTL_TRANSFER)), "_INBOX.abc.1"},
        answers_requests=True,
    ),
    # services/config: nats_api.py (cfg.*), outbound.py / carrier_queries.py (ctl), consumer.py, reaper.py
    "config": Uses(
        publish={*(S.ctl(a) for a in (sj.CTL_INITIATE, sj.CTL_HANGUP, sj.CTL_CALL_INFO, sj.CTL_BIND_NUMBER)),
                 *ENDED, *_stream(S.events_stream), *_pull(S.events_stream, durable_name(S), S.evt_all)},
        subscribe={*(S.cfg(a) for a in (sj.CFG_AGENT_RESOLVE, sj.CFG_TELEPHONY_MATCH, sj.CFG_TELEPHONY_CREDENTIALS,
                                        sj.CFG_RUN_CREATE, sj.CFG_RUN_UPDATE, sj.CFG_RUN_GET, sj.CFG_QUOTA_ACQUIRE,
                                        sj.CFG_QUOTA_RENEW, sj.CFG_QUOTA_RELEASE, sj.CFG_INBOUND_ROUTE)),
                   "_INBOX.abc.1"},
        answers_requests=True,
    ),
}
# What each service must never be allowed, whatever else changes: someone else's direction of a call,
# the carrier credentials (only call-control), serving another service's API, everything at once.
FORBIDDEN: dict[str, Uses] = {
    "ingress": Uses(publish={S.media_out(CALL), S.event_out(CALL), S.heartbeat(CALL),
                             S.cfg(sj.CFG_TELEPHONY_CREDENTIALS), S.ctl(sj.CTL_INITIATE), S.evt(sj.EVT_CALL_HANGUP),
                             "$KV.vb_ctl_legs.c1", "_INBOX.abc.1", "vb.anything", "$JS.API.STREAM.DELETE.VB_EVENTS"},
                    subscribe={S.cfg_all, S.ctl_all, S.dispatch_offer, S.media_in(CALL), ">"}),
    "agent-runner": Uses(publish={S.media_in(CALL), S.cfg(sj.CFG_RUN_CREATE), S.cfg(sj.CFG_TELEPHONY_CREDENTIALS),
                                  S.ctl(sj.CTL_HANGUP), S.dispatch_offer, "$KV.vb_ingress_pending.c1", "_INBOX.abc.1",
                                  "$JS.API.STREAM.PURGE.VB_EVENTS"},
                         subscribe={S.cfg_all, S.ctl_all, S.media_out(CALL), S.evt_all, ">"}),
    "call-control": Uses(publish={S.media_in(CALL), S.media_out(CALL), S.dispatch_offer, S.cfg(sj.CFG_RUN_CREATE),
                                  "$KV.vb_checkpoints.c1", "_INBOX.abc.1", "$JS.API.STREAM.DELETE.VB_INTENTS"},
                         subscribe={S.cfg_all, S.media_in(CALL), S.dispatch_offer, ">"}),
    "config": Uses(publish={S.media_in(CALL), S.dispatch_offer, S.cfg(sj.CFG_RUN_CREATE), S.intent(sj.INTENT_HANGUP),
                            S.evt(sj.EVT_CALL_STARTED), "$KV.vb_ctl_legs.c1", "_INBOX.abc.1"},
                   subscribe={S.ctl_all, S.media_in(CALL), S.dispatch_offer, ">"}),
}


def _perms() -> dict[str, object]:
    return {u.user: u for u in GEN.permissions("vb")}


def test_committed_file_is_the_generated_one() -> None:
    assert AUTH_CONF.read_text() == GEN.render("vb"), \
        "regenerate: python deploy/nats_permissions.py > deploy/k8s/nats-auth.conf"


def test_generator_names_buckets_and_consumers_as_the_services_do() -> None:
    b = GEN.bucket_names(S)
    assert b["ingress_pending"] == pending_bucket(S)
    assert (b["ctl_actions"], b["ctl_replay"], b["ctl_legs"]) == (actions_bucket(S), replay_bucket(S), legs_bucket(S))
    assert GEN.config_consumer(S) == durable_name(S)


def test_one_user_per_service_with_its_own_password_variable() -> None:
    perms = _perms()
    assert set(perms) == set(USES)
    envs = [u.password_env for u in perms.values()]
    assert len(set(envs)) == len(envs) and all(re.fullmatch(r"NATS_[A-Z_]+_PASSWORD", e) for e in envs)
    text = AUTH_CONF.read_text()
    for env in envs:
        assert f"password: ${env}\n" in text, "passwords are nats-server environment variables, never values"


@pytest.mark.parametrize("user", sorted(USES))
def test_grants_cover_every_subject_the_service_uses(user: str) -> None:
    u, need = _perms()[user], USES[user]
    for verb in ("publish", "subscribe"):
        missing = [s for s in getattr(need, verb) if not any(matches(p, s) for p in getattr(u, verb))]
        assert not missing, f"{user} may not {verb} {missing}"
    assert u.allow_responses == need.answers_requests


@pytest.mark.parametrize("user", sorted(USES))
def test_grants_are_no_broader_than_needed(user: str) -> None:
    u, need, bad = _perms()[user], USES[user], FORBIDDEN[user]
    for verb in ("publish", "subscribe"):
        granted = getattr(u, verb)
        unused = [p for p in granted if not any(matches(p, s) for s in getattr(need, verb))]
        assert not unused, f"{user} is granted {verb} {unused}, which nothing it runs uses"
        assert len(granted) == len(set(granted))
        for p in granted:
            assert p not in {">", "*", "vb.>", "$JS.>", "$JS.API.>", "$KV.>", "_INBOX.*"}, f"{user}: {p} is too wide"
        leaks = [s for s in getattr(bad, verb) if any(matches(p, s) for p in granted)]
        assert not leaks, f"{user} may {verb} {leaks}"


def test_only_call_control_may_ask_for_carrier_credentials() -> None:
    creds = S.cfg(sj.CFG_TELEPHONY_CREDENTIALS)
    allowed = {u.user for u in _perms().values() if any(matches(p, creds) for p in u.publish)}
    assert allowed == {"call-control"}


def test_another_prefix_renders_its_own_subjects() -> None:
    text = GEN.render("stage-2")
    assert '"stage-2.call.*.media.in"' in text and "STAGE_2_EVENTS" in text and "KV_stage_2_checkpoints" in text
    assert '"vb.' not in text and "_vb_" not in text


# ------------------------------------------------------------------------ live, in a real server ----
PASSWORDS = {u.user: secrets.token_hex(16) for u in GEN.permissions("vb")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def nats_env() -> dict[str, str]:
    return {**os.environ, **{u.password_env: PASSWORDS[u.user] for u in GEN.permissions("vb")}}


def test_nats_server_accepts_the_file_and_refuses_it_without_passwords(nats_env: dict[str, str],
                                                                       tmp_path: Path) -> None:
    ok = subprocess.run([nats_server_binary(), "-c", str(AUTH_CONF), "-t"], env=nats_env, capture_output=True,
                        text=True, cwd=tmp_path, timeout=30)
    assert ok.returncode == 0, ok.stderr
    env = {k: v for k, v in nats_env.items() if k != "NATS_CONFIG_PASSWORD"}
    bad = subprocess.run([nats_server_binary(), "-c", str(AUTH_CONF), "-t"], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=30)
    assert bad.returncode != 0 and "NATS_CONFIG_PASSWORD" in bad.stderr, "a missing password must stop the server"


@dataclass
class Server:
    url: str


@pytest.fixture(scope="module")
def server(nats_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = _free_port()
    store = tmp_path_factory.mktemp("nats-auth")
    proc = subprocess.Popen([nats_server_binary(), "-c", str(AUTH_CONF), "-a", "127.0.0.1", "-p", str(port),
                             "--jetstream", "--store_dir", str(store)], env=nats_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(port, proc)
        yield Server(f"nats://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"nats-server exited: {proc.stderr.read() if proc.stderr else ''}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)  # polling a port that is not open yet; bounded by the deadline
    raise AssertionError("nats-server did not listen in 15 s")


class Conn:
    """One service's connection; every server-side refusal (-ERR) lands in ``errors``."""

    def __init__(self) -> None:
        self.nc: NATS | None = None
        self.errors: list[str] = []
        self._new_error = asyncio.Event()

    async def connect(self, url: str, user: str, password: str) -> NATS:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e))
            self._new_error.set()

        self.nc = await nats.connect(url, user=user, password=password, error_cb=on_error,
                                     allow_reconnect=False, name=f"perm-test {user}")
        return self.nc

    async def refused(self, what: str, timeout: float = 3.0) -> str:
        """Wait for the server's permissions violation about ``what``."""
        async def wait() -> str:
            while True:
                for e in self.errors:
                    if "permissions violation" in e.lower() and what in e:
                        return e
                self._new_error.clear()
                await self._new_error.wait()

        return await asyncio.wait_for(wait(), timeout)


class Ping(BaseModel):
    n: int


@pytest.fixture
async def conns(server: Server) -> AsyncIterator[dict[str, Conn]]:
    out = {u: Conn() for u in USES}
    for user, conn in out.items():
        await conn.connect(server.url, user, PASSWORDS[user])
    yield out
    for conn in out.values():
        assert conn.nc is not None
        await conn.nc.close()


async def test_wrong_password_is_refused(server: Server) -> None:
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(server.url, user="ingress", password="wrong", allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=2)


async def test_each_service_runs_its_real_operations_under_its_user(conns: dict[str, Conn]) -> None:
    try:
        await _real_operations(conns)
    except (TimeoutError, nats.errors.Error, BusError) as e:  # a refusal shows as a timeout: say which
        raise AssertionError(f"{e!r}; refused: { {u: c.errors for u, c in conns.items() if c.errors} }") from e
    for user, conn in conns.items():
        assert not conn.errors, f"{user} was refused: {conn.errors}"


async def _real_operations(conns: dict[str, Conn]) -> None:
    ing, run, cc, cfg = (conns[u].nc for u in ("ingress", "agent-runner", "call-control", "config"))
    assert ing and run and cc and cfg
    # config: the events stream and its durable consumer; the cfg.* API
    cfg_js = cfg.jetstream()
    await ensure_events_stream(cfg_js, S)
    name = durable_name(S)
    events = await cfg_js.pull_subscribe(
        S.evt_all, durable=name, stream=S.events_stream,
        config=ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                              filter_subject=S.evt_all))

    async def answer(req: Ping) -> Ping:
        return Ping(n=req.n + 1)

    await serve(cfg, S.cfg(sj.CFG_RUN_GET), Ping, answer, queue=sj.CONFIG_QUEUE)
    # call-control: intents stream + its consumer, its KV buckets (claims with watch, legs keys()), ctl.* API
    cc_js = cc.jetstream()
    await ensure_intents_stream(cc_js, S)
    intents = await cc_js.pull_subscribe(S.intent_all, durable=INTENTS_CONSUMER, stream=S.intents_stream,
                                         config=ConsumerConfig(durable_name=INTENTS_CONSUMER,
                                                               ack_policy=AckPolicy.EXPLICIT))
    actions = await kv_bucket(cc, actions_bucket(S), 60)
    await actions.create(CALL, b"1")
    watcher = await actions.watch(CALL)
    assert (await watcher.updates(timeout=3)).value == b"1"
    await watcher.stop()
    await (await kv_bucket(cc, replay_bucket(S), 60)).create("digest", b"1")
    legs = await kv_bucket(cc, legs_bucket(S), 60)
    await legs.put(CALL, b"{}")
    assert await legs.keys() == [CALL]
    await serve(cc, S.ctl(sj.CTL_HANGUP), Ping, answer, queue=sj.CALL_CONTROL_QUEUE)
    # agent-runner: checkpoints, claims (create/update/watch/delete), the offer queue, call media in
    run_js = run.jetstream()
    await ensure_events_stream(run_js, S)
    checkpoints = await checkpoint_store(run_js, S)
    await checkpoints.put(CALL, b"cp")
    assert (await checkpoints.get(CALL)).value == b"cp"
    claims = await claims_store(run_js, S)
    rev = await claims.create(CALL, b"r1")
    await claims.update(CALL, b"r1", last=rev)
    claim_watch = await claims.watch(CALL)
    assert (await claim_watch.updates(timeout=3)).value == b"r1"
    await claim_watch.stop()
    await claims.delete(CALL)
    await serve(run, S.dispatch_offer, Ping, answer, queue=sj.RUNNER_QUEUE)
    media_in = await run.subscribe(S.media_in(CALL))
    await run.flush()
    # ingress: pending KV, its media-out wildcard, requests to all three, media, events, a hangup intent
    pending = await kv_bucket(ing, pending_bucket(S), 60)
    rev = await pending.create(CALL, b"p")
    await pending.update(CALL, b"used", last=rev)
    runner_out = await ing.subscribe(S.media_out(CALL).removesuffix("media.out") + "*.out")
    await ing.flush()
    for subject in (S.dispatch_offer, S.cfg(sj.CFG_RUN_GET), S.ctl(sj.CTL_HANGUP)):
        assert (await request(ing, subject, Ping(n=1), Ping, timeout=3)).n == 2, subject
    await ing.publish(S.media_in(CALL), b"frame-in")
    assert (await media_in.next_msg(timeout=3)).data == b"frame-in"
    await run.publish(S.media_out(CALL), b"frame-out")
    assert (await runner_out.next_msg(timeout=3)).data == b"frame-out"
    ing_js = ing.jetstream()
    ack = await ing_js.publish(S.evt(sj.EVT_CALL_STARTED), b"{}", headers={"Nats-Msg-Id": "e1"})
    assert ack.stream == S.events_stream
    await publish_hangup_intent(ing_js, S, HangupRequest(call_id=CALL, run_id=1, organization_id=1, reason="test"))
    await publish_hangup_intent(run_js, S, HangupRequest(call_id=CALL, run_id=1, organization_id=1, reason="test"))
    # the consumers get them and ack them ($JS.ACK)
    (evt,) = await events.fetch(1, timeout=3)
    await evt.ack_sync()
    (intent,) = await intents.fetch(1, timeout=3)
    await intent.ack_sync()


async def test_subjects_outside_the_grants_are_refused(conns: dict[str, Conn]) -> None:
    ing, run, cfg = conns["ingress"], conns["agent-runner"], conns["config"]
    assert ing.nc and run.nc and cfg.nc
    # A subscriber with every right sees what gets through; only the allowed publish arrives.
    spy = await conns["call-control"].nc.subscribe(S.media_out(CALL))  # type: ignore[union-attr]
    runner_in = await run.nc.subscribe(S.media_in(CALL))
    await run.nc.flush()
    await conns["call-control"].nc.flush()  # type: ignore[union-attr]
    await ing.nc.publish(S.media_out(CALL), b"spoofed agent audio")
    await ing.nc.publish(S.media_in(CALL), b"caller audio")
    assert (await runner_in.next_msg(timeout=3)).data == b"caller audio"
    await ing.refused(S.media_out(CALL))
    with pytest.raises(nats.errors.TimeoutError):
        await spy.next_msg(timeout=0.2)  # the refused frame never reached anyone
    # ingress may not ask for carrier credentials (no reply ever comes: the request is dropped)
    with pytest.raises(BusError):
        await request(ing.nc, S.cfg(sj.CFG_TELEPHONY_CREDENTIALS), Ping(n=1), Ping, timeout=0.5)
    await ing.refused(S.cfg(sj.CFG_TELEPHONY_CREDENTIALS))
    # the runner may not talk to config, nor subscribe to its API
    await run.nc.publish(S.cfg(sj.CFG_RUN_CREATE), b"{}")
    await run.refused(S.cfg(sj.CFG_RUN_CREATE))
    await run.nc.subscribe(S.cfg_all)
    await run.refused(S.cfg_all)
    # config may not listen to call audio; nobody may subscribe to everything
    await cfg.nc.subscribe(S.media_in(CALL))
    await cfg.refused(S.media_in(CALL))
    await ing.nc.subscribe(">")
    await ing.refused('">"')


# ------------------------------------------------------------------- wiring in deploy/k8s ----
def _perm(user: str) -> object:
    return _perms()[user]


def _env(container: dict[str, object]) -> list[dict[str, object]]:
    return list(container.get("env", []))  # type: ignore[arg-type]


@pytest.mark.parametrize("user", sorted(USES))
def test_each_deployment_connects_as_its_own_user(user: str) -> None:
    (container,) = _one("Deployment", user)["spec"]["template"]["spec"]["containers"]
    env = _env(container)
    names = [e["name"] for e in env]
    url_at = names.index("NATS_URL")
    assert names.index("NATS_USER") < url_at and names.index("NATS_PASSWORD") < url_at, \
        "$(VAR) only expands variables defined before it"
    by = {e["name"]: e for e in env}
    assert by["NATS_USER"]["value"] == user
    ref = by["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]  # type: ignore[index]
    assert (ref["name"], ref["key"]) == ("voicebus-secrets", _perm(user).password_env)  # type: ignore[attr-defined]
    assert by["NATS_URL"]["value"] == "$(NATS_SCHEME)://$(NATS_USER):$(NATS_PASSWORD)@$(NATS_ADDRESS)"
    others = {u.password_env for u in GEN.permissions("vb")} - {_perm(user).password_env}  # type: ignore[attr-defined]
    seen = {e["valueFrom"]["secretKeyRef"]["key"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert not seen & others, f"{user} can read other services' NATS passwords: {seen & others}"


def test_nats_server_loads_the_generated_file_with_every_password() -> None:
    kz = kustomization()
    (gen,) = [g for g in kz["configMapGenerator"] if g["name"] == "nats-config"]
    assert gen["files"] == ["auth.conf=nats-auth.conf"]
    spec = _one("StatefulSet", "nats")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert "--config=/etc/nats/auth.conf" in container["args"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/nats")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "nats-config"
    keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in _env(container) if "secretKeyRef" in e.get("valueFrom", {})}
    assert keys == {u.password_env for u in GEN.permissions("vb")}
    assert {e["name"] for e in _env(container) if e["name"] in keys} == keys, "env names are what the file reads"
    secret = _one("Secret", "voicebus-secrets")["stringData"]
    assert all(secret[k] == "REPLACE-ME" for k in keys), "only placeholders in git"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_tls_component_switches_every_client_to_tls(tmp_path: Path) -> None:
    """The overlay README.md shows: nats serves TLS from the cert Secret, every pod dials tls:// and trusts the CA."""
    assert KUBECTL is not None
    rel = Path(os.path.relpath(K8S, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(rel)], "components": [str(rel / "nats-tls")]}))
    proc = subprocess.run([KUBECTL, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for doc in built:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    (cm,) = [d for d in built if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "voicebus"]
    assert cm["data"]["NATS_SCHEME"] == "tls"
    (nats_ss,) = [d for d in built if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "nats"]
    pod = nats_ss["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert "--tls" in args and "--tlscert=/etc/nats-tls/tls.crt" in args and "--tlskey=/etc/nats-tls/tls.key" in args
    assert {"name": "tls", "secret": {"secretName": "nats-tls"}} in pod["volumes"]
    deployments = {d["metadata"]["name"]: d for d in built if d["kind"] == "Deployment"}
    for user in USES:
        spec = deployments[user]["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["SSL_CERT_FILE"] == "/etc/voicebus-ca/ca-bundle.crt", user
        assert {"name": "voicebus-ca", "configMap": {"name": "voicebus-ca-bundle"}} in spec["volumes"], user
    assert "SSL_CERT_FILE" not in str(deployments["redis"]), "only the NATS clients"
