"""Render the NATS users and least-privilege permissions of one voicebus stack (compose and Kubernetes).

Why a generator: every subject hangs off ``VOICEBUS_SUBJECT_PREFIX`` (and the JetStream stream and KV
bucket names derive from it), so a stack on another prefix needs its own permissions. The subjects
come from :class:`voicebus.bus.subjects.Subjects`, the one place the contract names them.

    .venv/bin/python deploy/nats_permissions.py --prefix vb > deploy/k8s/nats-auth.conf

Passwords are never in the output: each user's password is a reference to an environment variable
of the nats-server process (``$NATS_INGRESS_PASSWORD``...), which nats-server resolves at start and
refuses to start without.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from voicebus.bus import subjects as sj
from voicebus.bus.intents import INTENTS_CONSUMER
from voicebus.bus.subjects import Subjects

JS = "$JS.API"
# Replies to request-reply and to JetStream API calls arrive on the requester's inbox.
INBOX = "_INBOX.>"


@dataclass(frozen=True)
class UserPermissions:
    user: str
    password_env: str
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    # Answering requests: may publish once to the reply subject of a request it received, nothing more.
    allow_responses: bool = False


def bucket_names(s: Subjects) -> dict[str, str]:
    """KV buckets by role; the service modules name them the same way (a test holds them to it)."""
    p = s.prefix.replace("-", "_")
    return {
        "checkpoints": s.checkpoint_bucket,
        "claims": s.claims_bucket,
        "ingress_pending": f"{p}_ingress_pending",
        "ctl_actions": f"{p}_ctl_actions",
        "ctl_replay": f"{p}_ctl_replay",
        "ctl_legs": f"{p}_ctl_legs",
    }


def config_consumer(s: Subjects) -> str:
    """config's durable consumer on the events stream (voicebus.config.consumer.durable_name)."""
    return f"{s.prefix}-config-runs"


def _stream(name: str) -> list[str]:
    """Look a stream up and create it if missing (every service ensures the streams it writes to)."""
    return [f"{JS}.STREAM.INFO.{name}", f"{JS}.STREAM.CREATE.{name}"]


def _kv(bucket: str, *, watch: bool = False) -> list[str]:
    """A KV bucket: open/create its stream, put/create/update/delete keys (``$KV.<bucket>.<key>``), read
    a key (buckets are created without direct get, so reads go through the stream's MSG.GET)."""
    stream = f"KV_{bucket}"
    subjects = [*_stream(stream), f"$KV.{bucket}.>", f"{JS}.STREAM.MSG.GET.{stream}"]
    if watch:  # watch()/keys(): an ephemeral ordered push consumer (unnamed; its info is read once to
        # know whether the bucket has keys) and its flow-control replies
        subjects += [f"{JS}.CONSUMER.CREATE.{stream}", f"{JS}.CONSUMER.INFO.{stream}.*", f"$JS.FC.{stream}.>"]
    return subjects


def _pull(stream: str, durable: str) -> list[str]:
    """A durable pull consumer: look it up, create it (with its filter subject), fetch batches, ack each message."""
    return [f"{JS}.CONSUMER.INFO.{stream}.{durable}", f"{JS}.CONSUMER.CREATE.{stream}.{durable}.>",
            f"{JS}.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>"]


_ANY = "ANYCALL0"


def _per_call(subject: Callable[[str], str]) -> str:
    """A per-call subject with the call id as a wildcard (Subjects refuses '*' as a call id, rightly)."""
    built = subject(_ANY)
    assert built.count(f".{_ANY}.") + built.endswith(f".{_ANY}") == 1, built
    return built.replace(_ANY, "*")


def permissions(prefix: str = "vb") -> list[UserPermissions]:
    s = Subjects(prefix)
    b = bucket_names(s)
    ended = [s.evt(sj.EVT_CALL_ENDED), s.evt(sj.EVT_CALL_FAILED)]
    ingress = UserPermissions(
        "ingress", "NATS_INGRESS_PASSWORD",
        publish=[
            _per_call(s.media_in), _per_call(s.event_in), s.dispatch_offer,
            *(s.cfg(a) for a in (sj.CFG_AGENT_RESOLVE, sj.CFG_TELEPHONY_MATCH, sj.CFG_INBOUND_ROUTE,
                                 sj.CFG_RUN_CREATE, sj.CFG_RUN_UPDATE, sj.CFG_RUN_GET,
                                 sj.CFG_QUOTA_ACQUIRE, sj.CFG_QUOTA_RENEW, sj.CFG_QUOTA_RELEASE)),
            *(s.ctl(a) for a in (sj.CTL_LEG_REGISTER, sj.CTL_VERIFY, sj.CTL_HANGUP)),
            s.evt(sj.EVT_CALL_STARTED), s.evt(sj.EVT_CALL_STATUS), *ended,
            s.intent(sj.INTENT_HANGUP),
            *_stream(s.events_stream), *_stream(s.intents_stream), *_kv(b["ingress_pending"]),
        ],
        # The media pump subscribes to {prefix}.call.<id>.*.out (media.out and event.out in one).
        subscribe=[f"{s.prefix}.call.*.*.out", _per_call(s.heartbeat), INBOX],
    )
    runner = UserPermissions(
        "agent-runner", "NATS_AGENT_RUNNER_PASSWORD",
        publish=[
            _per_call(s.media_out), _per_call(s.event_out), _per_call(s.heartbeat),
            s.evt(sj.EVT_CALL_ANSWERED), *ended, s.intent(sj.INTENT_HANGUP),
            *_stream(s.events_stream), *_stream(s.intents_stream),
            *_kv(b["checkpoints"]), *_kv(b["claims"], watch=True),
        ],
        subscribe=[s.dispatch_offer, _per_call(s.media_in), _per_call(s.event_in), INBOX],
        allow_responses=True,
    )
    call_control = UserPermissions(
        "call-control", "NATS_CALL_CONTROL_PASSWORD",
        publish=[
            s.cfg(sj.CFG_TELEPHONY_CREDENTIALS), s.cfg(sj.CFG_RUN_GET),
            s.evt(sj.EVT_CALL_HANGUP), *ended,
            *_stream(s.events_stream), *_stream(s.intents_stream), *_pull(s.intents_stream, INTENTS_CONSUMER),
            *_kv(b["ctl_actions"], watch=True), *_kv(b["ctl_replay"]), *_kv(b["ctl_legs"], watch=True),
        ],
        subscribe=[*(s.ctl(a) for a in (sj.CTL_LEG_REGISTER, sj.CTL_VERIFY, sj.CTL_HANGUP, sj.CTL_INITIATE,
                                        sj.CTL_CALL_INFO, sj.CTL_BIND_NUMBER, sj.CTL_TRANSFER)), INBOX],
        allow_responses=True,
    )
    config = UserPermissions(
        "config", "NATS_CONFIG_PASSWORD",
        publish=[
            *(s.ctl(a) for a in (sj.CTL_INITIATE, sj.CTL_HANGUP, sj.CTL_CALL_INFO, sj.CTL_BIND_NUMBER)),
            *ended,  # the reaper ends runs whose call vanished
            *_stream(s.events_stream), *_pull(s.events_stream, config_consumer(s)),
        ],
        subscribe=[*(s.cfg(a) for a in (sj.CFG_AGENT_RESOLVE, sj.CFG_TELEPHONY_MATCH, sj.CFG_TELEPHONY_CREDENTIALS,
                                        sj.CFG_RUN_CREATE, sj.CFG_RUN_UPDATE, sj.CFG_RUN_GET,
                                        sj.CFG_QUOTA_ACQUIRE, sj.CFG_QUOTA_RENEW, sj.CFG_QUOTA_RELEASE,
                                        sj.CFG_INBOUND_ROUTE)), INBOX],
        allow_responses=True,
    )
    return [ingress, runner, call_control, config]


def _list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"  # quoted: "$JS..." is not a variable


def render(prefix: str = "vb") -> str:
    out = [
        f"# GENERATED by deploy/nats_permissions.py --prefix {prefix}: do not edit by hand.",
        "# One NATS user per voicebus service, each allowed only the subjects it uses (docs/deployment.md,",
        "# \"NATS users and permissions\"). Passwords are environment variables of nats-server, never here.",
        "# For another VOICEBUS_SUBJECT_PREFIX, regenerate: python deploy/nats_permissions.py --prefix <p>",
        "authorization {",
        "  timeout: 5",
        "  users: [",
    ]
    for u in permissions(prefix):
        out += [
            "    {",
            f"      user: {json.dumps(u.user)}",
            f"      password: ${u.password_env}",
            "      permissions: {",
            f"        publish: {{ allow: {_list(u.publish)} }}",
            f"        subscribe: {{ allow: {_list(u.subscribe)} }}",
        ]
        if u.allow_responses:
            out.append("        allow_responses: true")
        out += ["      }", "    }"]
    out += ["  ]", "}", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--prefix", default="vb", help="VOICEBUS_SUBJECT_PREFIX of the stack (default vb)")
    print(render(parser.parse_args().prefix), end="")


if __name__ == "__main__":
    main()
