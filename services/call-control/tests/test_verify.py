"""ctl.verify over real NATS: signatures checked with credentials from config, replays, failing closed."""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING, Any

import pytest

from voicebus.bus.messages import VerifyRequest, VerifyResult
from voicebus.bus.rpc import BusError
from voicebus.bus.subjects import CTL_VERIFY
from voicebus.call_control.service import REPLAY_TTL_S, replay_bucket

if TYPE_CHECKING:
    from conftest import Stack
else:
    Stack = Any

CONFIG_ID, FAKE_CONFIG_ID, FAKE_SECRET = 11, 21, "sig-0a1b2c3d4e5f"  # as in conftest.py
URL = "https://voice.example.test/api/v1/telephony/inbound/run?vb_token=url-token-77aa"
BODY = b"CallId=FK0001&From=%2B15550100009&To=%2B15550100001"


def verify_req(headers: dict[str, str], body: bytes = BODY, url: str = URL, config_id: int = FAKE_CONFIG_ID,
               method: str = "POST") -> VerifyRequest:
    return VerifyRequest(telephony_config_id=config_id, method=method, url=url, headers=headers,
                         body_b64=base64.b64encode(body).decode())


async def verify(stack: Stack, req: VerifyRequest) -> VerifyResult:
    return await stack.ask(CTL_VERIFY, req, VerifyResult, timeout=10)


async def test_valid_signature(stack: Stack) -> None:
    res = await verify(stack, verify_req(stack.fake.signed_headers("POST", URL, BODY)))
    assert (res.valid, res.reason, res.replayed) == (True, "", False)
    assert stack.fake.verifier.calls == 1


async def test_method_is_normalized_and_headers_matched_case_insensitively(stack: Stack) -> None:
    headers = {k.upper(): v for k, v in stack.fake.signed_headers("POST", URL, BODY).items()}
    res = await verify(stack, verify_req(headers, method="post"))
    assert res.valid


@pytest.mark.parametrize(("change", "reason"), [
    ("body", "X-Fake-Signature does not match"),
    ("url", "X-Fake-Signature does not match"),
    ("secret", "X-Fake-Signature does not match"),
    ("missing", "missing X-Fake-Signature"),
])
async def test_refusals(stack: Stack, change: str, reason: str) -> None:
    headers = stack.fake.signed_headers("POST", URL, BODY, secret="other-secret" if change == "secret" else FAKE_SECRET)
    if change == "missing":
        del headers["X-Fake-Signature"]
    req = verify_req(headers, body=BODY + b"&Extra=1" if change == "body" else BODY,
                     url=URL.replace("inbound/run", "twiml") if change == "url" else URL)
    res = await verify(stack, req)
    assert (res.valid, res.reason, res.replayed) == (False, reason, False)


async def test_rotated_secret_takes_effect_at_once(stack: Stack) -> None:
    headers = stack.fake.signed_headers("POST", URL, BODY)
    assert (await verify(stack, verify_req(headers))).valid
    stack.config.configs[FAKE_CONFIG_ID].credentials["signing_secret"] = "rotated-secret"
    assert not (await verify(stack, verify_req(headers))).valid
    rotated = stack.fake.signed_headers("POST", URL, BODY, secret="rotated-secret")
    assert (await verify(stack, verify_req(rotated))).valid


async def test_a_second_delivery_with_the_same_key_is_a_replay(stack: Stack) -> None:
    first = await verify(stack, verify_req(stack.fake.signed_headers("POST", URL, BODY, delivery="dlv-1")))
    again = await verify(stack, verify_req(stack.fake.signed_headers("POST", URL, BODY, delivery="dlv-1")))
    other = await verify(stack, verify_req(stack.fake.signed_headers("POST", URL, BODY, delivery="dlv-2")))
    assert [(r.valid, r.replayed) for r in (first, again, other)] == [(True, False), (True, True), (True, False)]
    # A refused request does not use up the key: the genuine delivery is still the first one.
    forged = stack.fake.signed_headers("POST", URL, BODY, secret="wrong", delivery="dlv-3")
    assert not (await verify(stack, verify_req(forged))).valid
    genuine = await verify(stack, verify_req(stack.fake.signed_headers("POST", URL, BODY, delivery="dlv-3")))
    assert (genuine.valid, genuine.replayed) == (True, False)


async def test_replay_keys_are_scoped_to_the_configuration(stack: Stack) -> None:
    stack.add_config(22, stack.fake.name, {"api_key": "k2", "signing_secret": FAKE_SECRET})
    a = await verify(stack, verify_req(stack.fake.signed_headers("POST", URL, BODY, delivery="dlv-x")))
    b = await verify(stack, verify_req(stack.fake.signed_headers("POST", URL, BODY, delivery="dlv-x"), config_id=22))
    assert (a.replayed, b.replayed) == (False, False)


async def test_concurrent_duplicates_yield_one_first_delivery(stack: Stack) -> None:
    import asyncio

    other = stack.make_service(instance_id="cc-v")
    await other.start()
    req = verify_req(stack.fake.signed_headers("POST", URL, BODY, delivery="dlv-race"))
    results = await asyncio.gather(*(verify(stack, req) for _ in range(6)))
    assert all(r.valid for r in results) and [r.replayed for r in results].count(False) == 1


async def test_replay_bucket_forgets_after_ten_minutes(stack: Stack) -> None:
    kv = await stack.nc.jetstream().key_value(replay_bucket(stack.subjects))
    status = await kv.status()
    assert REPLAY_TTL_S == 600 and status.ttl == pytest.approx(600)
    await verify(stack, verify_req(stack.fake.signed_headers("POST", URL, BODY, delivery="dlv-plain")))
    keys = await kv.keys()
    assert len(keys) == 1 and "dlv-plain" not in keys[0] and len(keys[0]) == 64  # hashed, not in clear


async def test_provider_that_does_not_sign(stack: Stack) -> None:
    res = await verify(stack, verify_req({"x-anything": "1"}, config_id=CONFIG_ID))
    assert (res.valid, res.reason) == (False, "Cloudonix does not sign its requests")


async def test_a_verifier_bug_fails_closed(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    stack.fake.verifier.explode = True
    caplog.set_level(logging.INFO)
    res = await verify(stack, verify_req(stack.fake.signed_headers("POST", URL, BODY)))
    assert (res.valid, res.reason) == (False, "the signature could not be checked")
    assert "RuntimeError" in caplog.text


async def test_bad_requests(stack: Stack) -> None:
    req = verify_req(stack.fake.signed_headers("POST", URL, BODY)).model_copy(update={"body_b64": "not base64!"})
    with pytest.raises(BusError) as e:
        await verify(stack, req)
    assert e.value.code == "invalid_request" and "base64" in e.value.message
    with pytest.raises(BusError) as e:
        await verify(stack, verify_req({}, body=b"x" * 70_000))
    assert e.value.code == "invalid_request" and "larger" in e.value.message
    with pytest.raises(BusError) as e:
        await verify(stack, verify_req({}, config_id=999))
    assert e.value.code == "not_found"
    stack.config.configs[FAKE_CONFIG_ID].credentials.pop("signing_secret")
    with pytest.raises(BusError) as e:
        await verify(stack, verify_req(stack.fake.signed_headers("POST", URL, BODY)))
    assert e.value.code == "carrier_auth_failed" and "signing_secret" in e.value.message


async def test_url_headers_and_secrets_never_logged(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = stack.fake.signed_headers("POST", URL, BODY, delivery="dlv-log")
    bad = stack.fake.signed_headers("POST", URL, BODY, secret="forged", delivery="dlv-log2")
    for headers in (good, good, bad):
        await verify(stack, verify_req(headers))
    assert "refused" in caplog.text and "replay" in caplog.text  # it did log its decisions
    for secret in ("url-token-77aa", FAKE_SECRET, good["X-Fake-Signature"], bad["X-Fake-Signature"], "dlv-log"):
        assert secret not in caplog.text
