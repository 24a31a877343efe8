"""``voicebus-sim``: place a simulated carrier call, or run a carrier REST stand-in.

    voicebus-sim call 'ws://127.0.0.1:8081/api/v1/agent-stream/<uuid>?provider=cloudonix&Domain=acme' \\
        --domain acme --cloudonix-api http://127.0.0.1:8090 --dtmf 1 --record call.wav
    voicebus-sim cloudonix-api --port 8090 --domain acme --token secret
    voicebus-sim call --provider twilio --voicebus http://127.0.0.1:8080 --account-sid AC... \\
        --auth-token ... --to +15550001000 --from +14445550100 --dtmf 1 --record call.wav
    voicebus-sim twilio-api --port 8092 --account-sid AC... --auth-token ... --number +15550001000

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
from voicebus.simulator.phone import PhoneScript


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

    c = sub.add_parser("call", help="dial an Agent Stream URL as Cloudonix would, or ring voicebus as Twilio would")
    c.add_argument("url", nargs="?",
                   help="Cloudonix: ws:// or wss:// Agent Stream URL (treated as a secret: never printed whole)")
    c.add_argument("--provider", choices=["cloudonix", "twilio"], default="cloudonix")
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
    t = c.add_argument_group("Twilio (--provider twilio): an inbound call rung through voicebus's webhook")
    t.add_argument("--voicebus", metavar="URL", help="voicebus ingress base URL, e.g. http://127.0.0.1:8080")
    t.add_argument("--path", default="/api/v1/telephony/inbound/run", help="webhook path (default %(default)s)")
    t.add_argument("--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID"),
                   help="Twilio account SID (default $TWILIO_ACCOUNT_SID)")
    t.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN"),
                   help="auth token that signs the requests (default $TWILIO_AUTH_TOKEN)")
    t.add_argument("--twilio-api", metavar="URL",
                   help="Twilio stand-in: register the call there so a REST hangup ends the stream")
    t.add_argument("--tamper", action="store_true", help="change a signed field (From) after signing")
    t.add_argument("--no-signature", action="store_true", help="send the webhook without X-Twilio-Signature")
    t.add_argument("--wrong-token", action="store_true", help="sign the webhook with a wrong auth token")
    t.add_argument("--replay", action="store_true", help="send the webhook twice with one idempotency token")
    t.add_argument("--reuse-token", action="store_true",
                   help="after the call, open the media socket again with the same <Parameter> token")

    w = sub.add_parser("twilio-api", help="run the Twilio REST API stand-in (and the calls it places)")
    w.add_argument("--host", default=os.environ.get("VOICEBUS_HTTP_HOST", "127.0.0.1"),
                   help="address to listen on (default $VOICEBUS_HTTP_HOST or 127.0.0.1)")
    w.add_argument("--port", type=int, default=8092)
    w.add_argument("--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID"),
                   help="the one account it serves (default $TWILIO_ACCOUNT_SID)")
    w.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN"),
                   help="its auth token: Basic auth and signatures (default $TWILIO_AUTH_TOKEN)")
    w.add_argument("--number", action="append", default=[], metavar="E164",
                   help="a number the account owns (IncomingPhoneNumbers; valid From)")
    w.add_argument("--callee", action="append", default=[], metavar="E164=BEHAVIOUR",
                   help="how a called number behaves: answer, busy, no-answer or fail (default answer)")
    w.add_argument("--callee-dtmf", default="", metavar="DIGITS", help="answered callees press these keys "
                   "once the agent stops speaking")
    w.add_argument("--callee-say", metavar="WAV", help="answered callees speak this WAV when the agent is quiet")
    w.add_argument("--ring-ms", type=int, default=100, help="how long calls ring (default 100)")
    w.add_argument("--max-call", type=float, default=120.0, metavar="S", help="callee hangs up after S seconds")
    w.add_argument("--record-dir", metavar="DIR", help="write what each callee heard to DIR/<CallSid>.wav")

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


def _phone(args: argparse.Namespace) -> PhoneScript:
    return PhoneScript(actions=list(getattr(args, "actions", None) or []), hangup_after_s=args.hangup_after,
                       max_duration_s=args.max_duration, agent_silence_ms=args.silence_ms, record_path=args.record)


async def _twilio_call(args: argparse.Namespace) -> int:
    from voicebus.simulator.twilio.dial import InboundCall, describe_event, dial_inbound

    missing = [opt for opt, v in (("--voicebus", args.voicebus), ("--account-sid", args.account_sid),
                                  ("--auth-token", args.auth_token)) if not v]
    if missing:
        print(f"voicebus-sim call --provider twilio: {', '.join(missing)} required", file=sys.stderr)
        return 2
    if not args.voicebus.startswith(("http://", "https://")):
        print("voicebus-sim call: --voicebus must start with http:// or https://", file=sys.stderr)
        return 2
    call = InboundCall(args.voicebus, args.account_sid, args.auth_token, to=args.callee, from_=args.caller,
                       path=args.path, phone=_phone(args), twilio_api=args.twilio_api, tamper=args.tamper,
                       no_signature=args.no_signature, wrong_token=args.wrong_token, replay=args.replay,
                       reuse_token=args.reuse_token)
    if args.call_sid:
        call.call_sid = args.call_sid
    live = not (args.json or args.quiet)

    def show(e: TimelineEvent) -> None:
        print(f"{e.t_ms:>7} ms  {describe_event(e)}", flush=True)

    try:
        report = await dial_inbound(call, on_event=show if live else None)
    except SimulatorError as e:
        print(f"voicebus-sim call: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(report.to_json())
    else:
        print(("\n" if live else "") + (report.render().split("\n\n", 1)[-1] if live else report.render()))
    return {"streamed": 0, "refused": 3}.get(report.outcome, 1)


async def _call(args: argparse.Namespace) -> int:
    if args.provider == "twilio":
        return await _twilio_call(args)
    if not args.url or not args.url.startswith(("ws://", "wss://")):
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


async def _serve_until_signal(app: Any, host: str, port: int, name: str, on_stop: Any) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    from voicebus.simulator._server import serve_app

    try:
        async with serve_app(app, host, port) as running:
            print(f"{name} stand-in listening on {running.url}", flush=True)
            await stop.wait()
            await on_stop()
    except OSError as e:
        print(f"voicebus-sim: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 1
    return 0


async def _twilio_api(args: argparse.Namespace) -> int:
    from voicebus.simulator.twilio.rest import BEHAVIOURS, Callee, TwilioState, create_app

    if not args.account_sid or not args.auth_token:
        print("voicebus-sim twilio-api: --account-sid and --auth-token are required", file=sys.stderr)
        return 2
    try:
        state = TwilioState(args.account_sid, args.auth_token, args.number, ring_ms=args.ring_ms,
                            max_call_s=args.max_call, record_dir=args.record_dir)
        if args.callee_say:
            CallerAction.say(args.callee_say)  # refuse an unreadable WAV now, not at the first call
        state.default_callee = Callee("answer", args.callee_dtmf, args.callee_say)
        for item in args.callee:
            number, sep, behaviour = item.partition("=")
            if not sep or behaviour not in BEHAVIOURS:
                raise ValueError(f"--callee {item!r}: expected E164=" + "|".join(BEHAVIOURS))
            state.set_callee(number, Callee(behaviour, args.callee_dtmf, args.callee_say))  # type: ignore[arg-type]
    except (ValueError, OSError, EOFError) as e:
        print(f"voicebus-sim twilio-api: {e}", file=sys.stderr)
        return 2
    for n in state.numbers.values():
        print(f"number {n.phone_number} ({n.sid})", flush=True)
    return await _serve_until_signal(create_app(state), args.host, args.port, "Twilio API", state.aclose)


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
    runner = {"call": _call, "twilio-api": _twilio_api, "cloudonix-api": _cloudonix_api}[args.command]
    try:
        code = asyncio.run(runner(args))
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
