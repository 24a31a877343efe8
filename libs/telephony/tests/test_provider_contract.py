"""The provider contract: every registered provider, checked by capability, against its own fake's kit.

Parametrized over ``registry.all_specs()``: a provider is exercised for each capability its spec
declares (webhook, verify, stream, rest), with the requests, frames and canned answers its fake's
``CONTRACT`` supplies (built from the carrier's side, signed with the carrier's SDK where there is
one). A new carrier joins this suite by registering its spec and exposing a ``CONTRACT``: no test code.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from pydantic import BaseModel

from voicebus.bus.messages import TelephonyMatch
from voicebus.telephony import all_specs, load_fake
from voicebus.telephony.calls import CarrierError
from voicebus.telephony.contract import ContractKit, RestCase
from voicebus.telephony.registry import ProviderSpec
from voicebus.telephony.stream import AudioIn, CarrierDisconnected, Frame, StreamContext, StreamRefused, StreamStart
from voicebus.telephony.webhook import MediaSocket, WebhookParseError, WebhookRequest

SPECS = all_specs()
CONFIG_ID = 41
ORG = 5
PUBLIC = "https://vb.example:8443"


def _params(pred: Any) -> list[Any]:
    return [pytest.param(s, id=s.name) for s in SPECS if pred(s)]


def _kit(spec: ProviderSpec) -> ContractKit:
    kit = load_fake(spec.name).CONTRACT
    assert isinstance(kit, ContractKit)
    return kit


def _secrets(spec: ProviderSpec, credentials: BaseModel) -> list[str]:
    return [v for f in spec.sensitive_fields if isinstance(v := getattr(credentials, f, ""), str) and v]


WEBHOOK = _params(lambda s: s.webhook is not None)
VERIFY = _params(lambda s: s.verifier is not None)
STREAM = _params(lambda s: s.stream is not None)
MEDIA_SOCKET = _params(lambda s: s.stream is not None and s.stream.media_socket is not None)
AGENT_STREAM = _params(lambda s: s.supports_agent_stream)
HAS_ANY = _params(lambda s: any((s.webhook, s.verifier, s.stream, s.rest)))
REST_CASES = [pytest.param(s, case, id=f"{s.name}: {case.name}")
              for s in SPECS if s.rest is not None for case in _kit(s).rest_cases]
STATUS_CASES = [pytest.param(s, word, expected, id=f"{s.name}: {word}")
                for s in SPECS if s.webhook is not None for word, expected in _kit(s).status_cases]


def inbound_url(spec: ProviderSpec) -> str:
    return f"{PUBLIC}/api/v1/telephony/inbound/run"


def status_url(spec: ProviderSpec) -> str:
    return f"{PUBLIC}/api/v1/telephony/{spec.name}/status-callback/9"


# ------------------------------------------------------------------------------------------ the kits exist
def test_the_suite_covers_some_provider_of_each_capability() -> None:
    assert WEBHOOK and VERIFY and STREAM and MEDIA_SOCKET and AGENT_STREAM and REST_CASES


@pytest.mark.parametrize("spec", HAS_ANY)
def test_every_capable_provider_has_a_complete_contract(spec: ProviderSpec) -> None:
    assert spec.fake is not None, f"{spec.name} declares capabilities but no fake module"
    kit = _kit(spec)
    assert kit.provider == spec.name
    assert isinstance(kit.credentials, spec.credentials_model)
    if spec.webhook is not None:
        assert kit.inbound_webhook and kit.status_webhook and kit.status_cases and kit.read_markup
        assert kit.read_refusal and kit.inbound_expect
    if spec.verifier is not None:
        assert kit.inbound_webhook and kit.signature_headers and kit.tamperings
        assert isinstance(kit.wrong_credentials, spec.credentials_model)
    if spec.stream is not None:
        assert kit.media_frame and kit.parse_sent and kit.audio_sample
        assert (spec.stream.media_socket is None) == (kit.media_socket_opening is None)
        assert (spec.stream.agent_stream is None) == (kit.agent_stream_opening is None)
    if spec.rest is not None:
        covered = {case.action for case in kit.rest_cases}
        assert set(spec.rest_actions) <= covered, f"REST actions without a contract case: {spec.rest_actions - covered}"
        assert kit.auth_header


# ------------------------------------------------------------------------------------------ webhook
@pytest.mark.parametrize("spec", WEBHOOK)
def test_inbound_webhook_is_detected_by_its_dialect_only(spec: ProviderSpec) -> None:
    req = _kit(spec).inbound_webhook(inbound_url(spec), _kit(spec).credentials)  # type: ignore[misc]
    detected = [s.name for s in SPECS if s.webhook is not None and s.webhook.detect(req)]
    assert detected == [spec.name]


@pytest.mark.parametrize("spec", WEBHOOK)
def test_inbound_webhook_parses_to_the_documented_call(spec: ProviderSpec) -> None:
    kit = _kit(spec)
    call = spec.webhook.parse_inbound(kit.inbound_webhook(inbound_url(spec), kit.credentials))  # type: ignore[union-attr,misc]
    assert {k: getattr(call, k) for k in kit.inbound_expect} == dict(kit.inbound_expect)


@pytest.mark.parametrize("spec", WEBHOOK)
@pytest.mark.parametrize("body", [b"", b"\xff\xfe\x00", b"a=1&b=2", b"{}", b"x" * 70_000])
def test_dialect_refuses_garbage_with_a_parse_error_and_detect_never_raises(spec: ProviderSpec, body: bytes) -> None:
    req = WebhookRequest("POST", inbound_url(spec), {"content-type": "application/x-www-form-urlencoded"}, body)
    assert spec.webhook.detect(req) is False  # type: ignore[union-attr]
    with pytest.raises(WebhookParseError) as info:
        spec.webhook.parse_inbound(req)  # type: ignore[union-attr]
    assert str(info.value)
    with pytest.raises(WebhookParseError):
        spec.webhook.parse_status(req)  # type: ignore[union-attr]


@pytest.mark.parametrize("with_status", [True, False])
@pytest.mark.parametrize("spec", WEBHOOK)
def test_answer_markup_points_the_carrier_at_the_socket(spec: ProviderSpec, with_status: bool) -> None:
    kit = _kit(spec)
    socket = MediaSocket(url="wss://vb.example:8443/api/v1/telephony/media/call-7f3a",
                         token="tok-&<'\"-9Xq", status_url=status_url(spec) if with_status else None)
    call = spec.webhook.parse_inbound(kit.inbound_webhook(inbound_url(spec), kit.credentials))  # type: ignore[union-attr,misc]
    markup = spec.webhook.answer_stream(socket, call)  # type: ignore[union-attr]
    target = kit.read_markup(markup)  # type: ignore[misc]
    assert (target.url, target.token, target.status_url) == (socket.url, socket.token, socket.status_url)
    assert markup.status_code == 200 and markup.media_type
    assert socket.token not in target.url


@pytest.mark.parametrize("spec", WEBHOOK)
def test_refusal_markup_says_the_message_and_hangs_up(spec: ProviderSpec) -> None:
    message = "This number is not configured <here> & now. Goodbye."
    assert _kit(spec).read_refusal(spec.webhook.answer_refusal(message)) == message  # type: ignore[union-attr,misc]


@pytest.mark.parametrize(("spec", "word", "expected"), STATUS_CASES)
def test_status_callbacks_map_onto_the_normalized_statuses(spec: ProviderSpec, word: str, expected: str | None) -> None:
    kit = _kit(spec)
    update = spec.webhook.parse_status(kit.status_webhook(status_url(spec), kit.credentials, word))  # type: ignore[union-attr,misc]
    assert (update.status, update.raw_status) == (expected, word)
    assert update.carrier_call_id


# ------------------------------------------------------------------------------------------ verify
def _signed_requests(spec: ProviderSpec, credentials: BaseModel) -> dict[str, WebhookRequest]:
    kit = _kit(spec)
    out = {"inbound": kit.inbound_webhook(inbound_url(spec), credentials)}  # type: ignore[misc]
    if kit.status_webhook is not None and kit.status_cases:
        out["status"] = kit.status_webhook(status_url(spec), credentials, kit.status_cases[0][0])
    if kit.signed_upgrade is not None:
        out["upgrade"] = kit.signed_upgrade("wss://vb.example:8443/api/v1/telephony/media/call-7f3a", credentials)
    return out


@pytest.mark.parametrize("spec", VERIFY)
def test_signatures_made_as_the_carrier_makes_them_are_accepted(spec: ProviderSpec) -> None:
    kit = _kit(spec)
    for what, req in _signed_requests(spec, kit.credentials).items():
        verdict = spec.verifier.verify(req, kit.credentials, now=1_700_000_000.0)  # type: ignore[union-attr]
        assert verdict.ok, f"{what}: {verdict.reason}"


@pytest.mark.parametrize("spec", VERIFY)
def test_signatures_with_another_secret_are_refused(spec: ProviderSpec) -> None:
    kit = _kit(spec)
    for what, req in _signed_requests(spec, kit.wrong_credentials).items():  # type: ignore[arg-type]
        verdict = spec.verifier.verify(req, kit.credentials, now=1_700_000_000.0)  # type: ignore[union-attr]
        assert not verdict.ok and verdict.reason, what
        assert all(secret not in verdict.reason for secret in _secrets(spec, kit.credentials))


@pytest.mark.parametrize("spec", VERIFY)
def test_unsigned_requests_are_refused(spec: ProviderSpec) -> None:
    kit = _kit(spec)
    for what, req in _signed_requests(spec, kit.credentials).items():
        headers = {k: v for k, v in req.headers.items() if k not in kit.signature_headers}
        verdict = spec.verifier.verify(replace(req, headers=headers), kit.credentials, now=1_700_000_000.0)  # type: ignore[union-attr]
        assert not verdict.ok and verdict.reason, what


@pytest.mark.parametrize("spec", VERIFY)
def test_tampered_requests_are_refused(spec: ProviderSpec) -> None:
    kit = _kit(spec)
    req = kit.inbound_webhook(inbound_url(spec), kit.credentials)  # type: ignore[misc]
    for what, tamper in kit.tamperings.items():
        altered = tamper(req)
        assert altered != req, f"tampering {what!r} changed nothing"
        verdict = spec.verifier.verify(altered, kit.credentials, now=1_700_000_000.0)  # type: ignore[union-attr]
        assert not verdict.ok and verdict.reason, what


@pytest.mark.parametrize("spec", VERIFY)
@pytest.mark.parametrize("req", [
    WebhookRequest("POST", "not a url", {"x": "y"}, b""),
    WebhookRequest("POST", "https://vb.example:notaport/x", {}, b"\xff" * 10),
    WebhookRequest("GET", "", {}, b""),
])
def test_verifiers_fail_closed_on_malformed_requests(spec: ProviderSpec, req: WebhookRequest) -> None:
    kit = _kit(spec)
    signed = _signed_requests(spec, kit.credentials)["inbound"]
    for candidate in (req, replace(req, headers=dict(signed.headers))):
        verdict = spec.verifier.verify(candidate, kit.credentials, now=1_700_000_000.0)  # type: ignore[union-attr]
        assert not verdict.ok and verdict.reason


# ------------------------------------------------------------------------------------------ stream
class Services:
    def __init__(self, account_id: str | None, provider: str, *, verdicts: bool = True) -> None:
        self.account_id = account_id
        self.provider = provider
        self.verdicts = verdicts
        self.asked: list[tuple[str, Any]] = []

    async def match_telephony(self, organization_id: int, provider: str, account_id: str) -> TelephonyMatch | None:
        self.asked.append(("match", (organization_id, provider, account_id)))
        if account_id != self.account_id or provider != self.provider:
            return None
        return TelephonyMatch(telephony_config_id=CONFIG_ID, provider=provider, name="main", account_id=account_id,
                              has_credentials=True)

    async def confirm_call(self, telephony_config_id: int, carrier_call_id: str) -> bool:
        self.asked.append(("confirm", (telephony_config_id, carrier_call_id)))
        return self.verdicts

    async def verify_upgrade(self, telephony_config_id: int) -> tuple[bool, str]:
        self.asked.append(("verify", telephony_config_id))
        return self.verdicts, "" if self.verdicts else "signature does not match"


def frames(*items: Frame):
    queue: asyncio.Queue[Frame] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def receive() -> Frame:
        if queue.empty():
            await asyncio.Event().wait()  # the carrier goes silent: only the handshake deadline ends this
        return queue.get_nowait()

    return receive


def _ctx(services: Services, *, params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
         config_id: int | None = None, timeout_s: float = 2.0) -> StreamContext:
    upgrade = WebhookRequest("GET", "wss://vb.example:8443/api/v1/agent-stream/agent-1", dict(headers or {}))
    return StreamContext(params=dict(params or {}), upgrade=upgrade, organization_id=ORG, services=services,
                         timeout_s=timeout_s, telephony_config_id=config_id)


async def _open(spec: ProviderSpec) -> StreamStart:
    """A successful handshake on whichever entry point the provider has (media socket first)."""
    kit = _kit(spec)
    if spec.stream.media_socket is not None:  # type: ignore[union-attr]
        opening = kit.media_socket_opening("tok-contract")  # type: ignore[misc]
        ctx = _ctx(Services(None, spec.name), params=dict(opening.params), headers=dict(opening.headers),
                   config_id=CONFIG_ID)
        return await spec.stream.media_socket(frames(*opening.frames), ctx)  # type: ignore[union-attr]
    opening = kit.agent_stream_opening()  # type: ignore[misc]
    ctx = _ctx(Services(opening.account_id, spec.name), params=dict(opening.params), headers=dict(opening.headers))
    return await spec.stream.agent_stream(frames(*opening.frames), ctx)  # type: ignore[union-attr]


@pytest.mark.parametrize("spec", MEDIA_SOCKET)
async def test_media_socket_handshake_returns_the_echoed_token(spec: ProviderSpec) -> None:
    opening = _kit(spec).media_socket_opening("tok-single-use-1")  # type: ignore[misc]
    ctx = _ctx(Services(None, spec.name), params=dict(opening.params), headers=dict(opening.headers),
               config_id=CONFIG_ID)
    start = await spec.stream.media_socket(frames(*opening.frames), ctx)  # type: ignore[union-attr]
    assert (start.provider, start.telephony_config_id, start.token) == (spec.name, CONFIG_ID, "tok-single-use-1")
    assert (start.carrier_call_ref, start.stream_id) == (opening.carrier_call_ref, opening.stream_id)
    assert start.codec.sample_rate == spec.stream.sample_rate  # type: ignore[union-attr]
    assert "tok-single-use-1" not in json.dumps(start.log_fields) + json.dumps(start.gathered_context) + repr(start)


@pytest.mark.parametrize("spec", AGENT_STREAM)
async def test_agent_stream_handshake_finds_the_configuration(spec: ProviderSpec) -> None:
    opening = _kit(spec).agent_stream_opening()  # type: ignore[misc]
    services = Services(opening.account_id, spec.name)
    ctx = _ctx(services, params=dict(opening.params), headers=dict(opening.headers))
    start = await spec.stream.agent_stream(frames(*opening.frames), ctx)  # type: ignore[union-attr]
    assert (start.provider, start.telephony_config_id) == (spec.name, CONFIG_ID)
    assert (start.carrier_call_ref, start.stream_id) == (opening.carrier_call_ref, opening.stream_id)
    assert ("match", (ORG, spec.name, opening.account_id)) in services.asked


@pytest.mark.parametrize("spec", AGENT_STREAM)
async def test_agent_stream_refuses_an_unknown_account_and_a_failed_check(spec: ProviderSpec) -> None:
    opening = _kit(spec).agent_stream_opening()  # type: ignore[misc]
    for services in (Services("someone-else", spec.name), Services(opening.account_id, spec.name, verdicts=False)):
        ctx = _ctx(services, params=dict(opening.params), headers=dict(opening.headers))
        with pytest.raises(StreamRefused) as info:
            await spec.stream.agent_stream(frames(*opening.frames), ctx)  # type: ignore[union-attr]
        assert info.value.kind == "handshake" and info.value.reason


@pytest.mark.parametrize("spec", STREAM)
async def test_a_silent_carrier_times_out(spec: ProviderSpec) -> None:
    kit = _kit(spec)
    if spec.stream.media_socket is not None:  # type: ignore[union-attr]
        opening = kit.media_socket_opening("tok")  # type: ignore[misc]
        handshake, services = spec.stream.media_socket, Services(None, spec.name)  # type: ignore[union-attr]
    else:
        opening = kit.agent_stream_opening()  # type: ignore[misc]
        handshake, services = spec.stream.agent_stream, Services(opening.account_id, spec.name)  # type: ignore[union-attr]
    ctx = _ctx(services, params=dict(opening.params), headers=dict(opening.headers), config_id=CONFIG_ID,
               timeout_s=0.05)
    with pytest.raises(StreamRefused) as info:
        await handshake(frames(*opening.frames[:1]), ctx)  # type: ignore[misc]
    assert (info.value.kind, info.value.reason) == ("timeout", "Handshake timeout")


@pytest.mark.parametrize("spec", STREAM)
async def test_a_carrier_that_hangs_up_during_the_handshake_is_reported_as_such(spec: ProviderSpec) -> None:
    async def gone() -> Frame:
        raise CarrierDisconnected(1000)

    kit = _kit(spec)
    if spec.stream.media_socket is not None:  # type: ignore[union-attr]
        handshake, services, config = spec.stream.media_socket, Services(None, spec.name), CONFIG_ID  # type: ignore[union-attr]
        opening = kit.media_socket_opening("tok")  # type: ignore[misc]
    else:
        opening = kit.agent_stream_opening()  # type: ignore[misc]
        handshake, services, config = spec.stream.agent_stream, Services(opening.account_id, spec.name), None  # type: ignore[union-attr]
    with pytest.raises(CarrierDisconnected):
        await handshake(gone, _ctx(services, params=dict(opening.params), headers=dict(opening.headers),  # type: ignore[misc]
                                   config_id=config))


@pytest.mark.parametrize("spec", STREAM)
async def test_dialect_round_trip(spec: ProviderSpec) -> None:
    kit = _kit(spec)
    codec = (await _open(spec)).codec
    sample = kit.audio_sample
    assert codec.decode(kit.media_frame(sample, 3)) == AudioIn(sample)  # type: ignore[misc]
    sent = kit.parse_sent(codec.encode_audio(sample))  # type: ignore[misc]
    assert (sent.kind, sent.pcm16) == ("media", sample)
    clear = codec.encode_clear()
    assert clear is None or kit.parse_sent(clear).kind == "clear"  # type: ignore[misc]
    mark = codec.encode_mark("turn-3")
    if mark is not None:
        parsed = kit.parse_sent(mark)  # type: ignore[misc]
        assert (parsed.kind, parsed.name) == ("mark", "turn-3")


# ------------------------------------------------------------------------------------------ rest
def _request_fields(request: httpx.Request) -> dict[str, list[str]]:
    if request.method == "GET":
        return {k: [v for kk, v in request.url.params.multi_items() if kk == k] for k in request.url.params}
    content_type = request.headers.get("content-type", "").split(";")[0]
    body = request.content.decode("utf-8")
    if content_type == "application/json":
        loaded = json.loads(body or "{}")
        return {k: v if isinstance(v, list) else [str(v)] for k, v in loaded.items()}
    return parse_qs(body, keep_blank_values=True)


@pytest.mark.parametrize(("spec", "case"), REST_CASES)
async def test_rest_calls_are_shaped_as_the_carrier_documents(spec: ProviderSpec, case: RestCase) -> None:
    kit = _kit(spec)
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) > len(case.exchanges):
            return httpx.Response(599, text="unexpected extra request")
        exchange = case.exchanges[len(seen) - 1]
        if exchange.body is None:
            return httpx.Response(exchange.status)
        return httpx.Response(exchange.status, json=exchange.body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        client = spec.rest(kit.credentials, "http://carrier.test", http)  # type: ignore[misc]
        assert all(secret not in repr(client) for secret in _secrets(spec, kit.credentials))
        call = getattr(client, case.action)(*case.args)
        if case.error is not None:
            with pytest.raises(CarrierError) as info:
                await call
            assert info.value.code == case.error
            assert all(secret not in str(info.value) for secret in _secrets(spec, kit.credentials))
        else:
            result = await call
            if isinstance(case.expected, dict) and not isinstance(result, dict):
                assert {k: getattr(result, k) for k in case.expected} == case.expected
            else:
                assert result == case.expected

    assert len(seen) == len(case.exchanges)
    for request, exchange in zip(seen, case.exchanges, strict=True):
        assert request.method == exchange.method
        assert request.url.host == "carrier.test"
        assert re.fullmatch(exchange.path, request.url.path), request.url.path
        assert request.headers.get("authorization") == kit.auth_header
        fields = _request_fields(request)
        for name, value in exchange.fields.items():
            assert fields.get(name) == (value if isinstance(value, list) else [value]), name
