"""``voicebus-sim``: place a simulated carrier call, or run a carrier REST stand-in.

    voicebus-sim call 'ws://127.0.0.1:8081/api/v1/agent-stream/<uuid>?provider=cloudonix&Domain=acme' \\
        --domain acme --cloudonix-api http://127.0.0.1:8090 --dtmf 1 --record call.wav
    voicebus-sim cloudonix-api --port 8090 --domain acme --token secret

Caller actions run in the order given. ``--dtmf 12`` presses 1 then 2 once the agent has stopped
speaking; ``--dtmf 1@2500`` presses 1 at 2.5 s after ``start``; ``--say hello.wav@500`` speaks a WAV
file at 0.5 s (barge-in); ``--hangup-at 8000`` hangs up at 8 s as a scripted step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from voicebus.simulator.call import CallerAction, CallScript, SimulatorError, TimelineEvent, _describe, place_call


def _split_at(value: str) -> tuple[str, int | None]:
    head, sep, tail = value.rpartition("@")
    if not sep:
        return value, None
    try:
        at = int(tail)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: the part after @ must be milliseconds") from None
    if at < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: time must not be negative")
    return head, at


class _AddAction(argparse.Action):
    """Keeps --dtmf/--say/--hangup-at in one list, in command-line order."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        actions: list[CallerAction] = getattr(namespace, "actions", None) or []
        try:
            if self.dest == "dtmf":
                digits, at = _split_at(values)
                actions.append(CallerAction.dtmf(digits, at))
            elif self.dest == "say":
                path, at = _split_at(values)
                actions.append(CallerAction.say(path, at))
            else:
                actions.append(CallerAction.hangup(int(values)))
        except (ValueError, OSError, EOFError, argparse.ArgumentTypeError) as e:
            parser.error(f"{option_string}: {e}")
        namespace.actions = actions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voicebus-sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("call", help="dial an Agent Stream URL as Cloudonix would")
    c.add_argument("url", help="ws:// or wss:// Agent Stream URL (treated as a secret: never printed whole)")
    c.add_argument("--domain", default="sim.cloudonix.net", help="Cloudonix domain (start.accountSid)")
    c.add_argument("--session", help="Cloudonix session token (default: random)")
    c.add_argument("--call-sid")
    c.add_argument("--stream-sid")
    c.add_argument("--from", dest="caller", default="+15555550100")
    c.add_argument("--to", dest="callee", default="+15555550199")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="start.customParameters")
    c.add_argument("--dtmf", action=_AddAction, metavar="DIGITS[@MS]",
                   help="press keys after the agent stops speaking, or at MS after start")
    c.add_argument("--say", action=_AddAction, metavar="WAV[@MS]",
                   help="speak a WAV file (any rate; resampled to 8 kHz mono) when the agent is quiet or at MS")
    c.add_argument("--hangup-at", action=_AddAction, metavar="MS", help="hang up at MS after start (a script step)")
    c.add_argument("--hangup-after", type=float, metavar="S", help="hang up S seconds after start")
    c.add_argument("--max-duration", type=float, default=60.0, metavar="S",
                   help="hang up after S seconds at the latest (default 60)")
    c.add_argument("--silence-ms", type=int, default=700,
                   help="agent quiet this long = it stopped speaking (default 700)")
    c.add_argument("--record", metavar="WAV", help="write what the caller heard (8 kHz PCM16 mono, time-aligned)")
    c.add_argument("--cloudonix-api", metavar="URL",
                   help="Cloudonix stand-in: register the session there first and end the call if it is hung up")
    c.add_argument("--handshake", default="normal",
                   choices=["normal", "skip_connected", "malformed_start", "no_start", "nothing"])
    c.add_argument("--omit", action="append", default=[], metavar="FIELD", help="leave FIELD out of start.start")
    c.add_argument("--json", action="store_true", help="print the report as JSON instead of a timeline")
    c.add_argument("--quiet", action="store_true", help="no live timeline, only the final report")

    a = sub.add_parser("cloudonix-api", help="run the Cloudonix REST API stand-in")
    a.add_argument("--host", default=os.environ.get("VOICEBUS_HTTP_HOST", "127.0.0.1"),
                   help="address to listen on (default $VOICEBUS_HTTP_HOST or 127.0.0.1)")
    a.add_argument("--port", type=int, default=8090)
    a.add_argument("--domain", action="append", default=[], help="register a domain (with --token)")
    a.add_argument("--token", action="append", default=[], help="bearer token of the matching --domain")
    return p


def _script(args: argparse.Namespace) -> CallScript:
    params: dict[str, Any] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param {item!r}: expected KEY=VALUE")
        params[key] = value
    script = CallScript(domain=args.domain, caller=args.caller, callee=args.callee, custom_parameters=params,
                        actions=list(getattr(args, "actions", None) or []), hangup_after_s=args.hangup_after,
                        max_duration_s=args.max_duration, agent_silence_ms=args.silence_ms,
                        record_path=args.record, cloudonix_api=args.cloudonix_api, handshake=args.handshake,
                        omit_start_fields=tuple(args.omit))
    for name in ("session", "call_sid", "stream_sid"):
        if getattr(args, name):
            setattr(script, name, getattr(args, name))
    return script


async def _call(args: argparse.Namespace) -> int:
    if not args.url.startswith(("ws://", "wss://")):
        print("voicebus-sim call: the URL must start with ws:// or wss://", file=sys.stderr)
        return 2
    live = not (args.json or args.quiet)

    def show(e: TimelineEvent) -> None:
        print(f"{e.t_ms:>7} ms  {_describe(e)}", flush=True)

    try:
        report = await place_call(args.url, _script(args), on_event=show if live else None)
    except SimulatorError as e:
        print(f"voicebus-sim call: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(report.to_json())
    else:
        if live:
            print()
        print(report.render() if not live else report.render().split("\n\n", 1)[-1])
    return 1 if report.error else 0


async def _cloudonix_api(args: argparse.Namespace) -> int:
    from voicebus.simulator._server import serve_app
    from voicebus.simulator.cloudonix_api import CloudonixState, create_app

    if len(args.domain) != len(args.token):
        print("voicebus-sim cloudonix-api: give one --token per --domain", file=sys.stderr)
        return 2
    state = CloudonixState()
    try:
        for domain, token in zip(args.domain, args.token, strict=True):
            print(f"domain {state.add_domain(domain, token)} registered", flush=True)
    except ValueError as e:
        print(f"voicebus-sim cloudonix-api: {e}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with serve_app(create_app(state), args.host, args.port) as running:
            print(f"Cloudonix API stand-in listening on {running.url}", flush=True)
            await stop.wait()
            state.closing.set()  # release long-polls before the server waits for them
    except OSError as e:
        print(f"voicebus-sim cloudonix-api: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runner = _call if args.command == "call" else _cloudonix_api
    try:
        code = asyncio.run(runner(args))
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
