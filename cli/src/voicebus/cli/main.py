"""``voicebus``: run the embedded stack (``up``) or the demo call (``demo``)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from voicebus.cli.embedded import free_port
from voicebus.cli.stack import Stack, StackConfig, safe_url


def _up(args: argparse.Namespace) -> int:
    home = Path(args.home)
    if args.port_base == 0:
        ingress, config, control = free_port(), free_port(), free_port()
        runners = tuple(free_port() for _ in range(args.runners))
    else:
        base = args.port_base
        ingress, config, control = base, base + 1, base + 3
        runners = (base + 2, *(base + 4 + i for i in range(args.runners - 1)))
    cfg = StackConfig.from_env(
        home, ingress_port=ingress, config_port=config, call_control_port=control, runner_ports=runners,
        subject_prefix=os.environ.get("VOICEBUS_SUBJECT_PREFIX", "vb"), runner_capacity=args.capacity,
    )  # carrier API URLs: VOICEBUS_CARRIER_API_URLS from the environment reaches call-control as it is
    stack = Stack(cfg)
    stopped = threading.Event()
    # Explicit handlers: a shell may start us with SIGINT ignored (background job), and Ctrl-C must
    # mean "stop the services cleanly", not an exception at an arbitrary point of start-up.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        stack.start_servers()
        stack.start_services()
        if stopped.is_set():
            return 130
        for line in _up_banner(stack, args.home):
            stack.say(line)
        while not stopped.wait(0.5):
            dead = [n for n, s in stack.services.items() if not s.alive]
            if dead:
                stack.say(f"{', '.join(dead)} exited; stopping the stack")
                return 1
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as e:
        print(f"voicebus: {e}", file=sys.stderr)
        return 1
    finally:
        stack.say("stopping ...")
        stack.stop()
        stack.say("stopped")
    return 0


def _up_banner(stack: Stack, home: str) -> list[str]:
    """What a newcomer can paste as it is (from the checkout, in another terminal)."""
    home_arg = "" if home == ".voicebus" else f" --home {shlex.quote(home)}"
    return [
        "",
        "voicebus is up. Ctrl-C stops everything. In another terminal, from this folder:",
        f"  First API key:  ./voicebus create-org --name 'My org'{home_arg}",
        f"  Admin API:      {stack.config_url}/docs  (Authorization: Bearer <api key>)",
        f"  Agent Stream:   {stack.ingress_ws_url}/api/v1/agent-stream/<agent_uuid>?provider=cloudonix&Domain=<domain>",
        f"  Inbound calls:  POST {stack.ingress_url}/api/v1/telephony/inbound/run  (your numbers' voice webhook)",
        f"  Outbound calls: POST {stack.config_url}/api/v1/telephony/initiate-call",
        f"  Database:       {safe_url(stack.database_url)}",
    ]


def _create_org(args: argparse.Namespace) -> int:
    """``voicebus-config create-org`` against the embedded stack's database and key, so nothing needs exporting."""
    home = Path(args.home)
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", f"sqlite+aiosqlite:///{(home / 'voicebus.db').resolve()}")
    env.setdefault("VOICEBUS_SECRET_KEY_FILE", str((home / "secret.key").resolve()))
    argv = [str(Path(sys.executable).parent / "voicebus-config"), "create-org", "--name", args.name]
    if args.concurrent_calls is not None:
        argv += ["--concurrent-calls", str(args.concurrent_calls)]
    if args.json:
        argv.append("--json")
    return subprocess.call(argv, env=env)


def _demo(args: argparse.Namespace) -> int:
    from voicebus.cli.demo import run_demo

    return run_demo(Path(args.home), as_json=args.json)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="voicebus", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="run NATS, Valkey, SQLite and the four services until Ctrl-C")
    up.add_argument("--home", default=".voicebus", help="where embedded data and logs live (default .voicebus)")
    up.add_argument("--port-base", type=int, default=8080,
                    help="ingress BASE, config BASE+1, runner BASE+2, call-control BASE+3, "
                         "more runners BASE+4..; 0 = any free ports (default 8080)")
    up.add_argument("--runners", type=int, default=1, choices=range(1, 6), metavar="N",
                    help="agent-runner replicas, 1-5 (default 1)")
    up.add_argument("--capacity", type=int, default=4, help="calls per runner (default 4)")
    up.set_defaults(func=_up)
    org = sub.add_parser("create-org", help="create an organization and its first API key in the stack's database")
    org.add_argument("--name", required=True, help="the organization's name")
    org.add_argument("--concurrent-calls", type=int, default=None, help="its concurrent-call limit")
    org.add_argument("--home", default=".voicebus", help="the stack's home (default .voicebus)")
    org.add_argument("--json", action="store_true", help="print the result as JSON")
    org.set_defaults(func=_create_org)
    demo = sub.add_parser("demo", help="start the embedded stack and place a simulated call on every carrier path "
                                       "(Cloudonix Agent Stream, Twilio inbound, Twilio outbound) at once")
    demo.add_argument("--home", default=".voicebus/demo", help="where the demo keeps its data and recording")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
