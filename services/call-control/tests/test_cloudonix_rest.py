"""The Cloudonix REST client (reached through the registry, as call-control does) against the stand-in over
real HTTP; the retry budget test builds the client directly to shorten its budgets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from voicebus.simulator.cloudonix_api import RunningCloudonixApi, run_cloudonix_api
from voicebus.telephony import get_spec
from voicebus.telephony.calls import CarrierError
from voicebus.telephony.providers.cloudonix.rest import CloudonixClient
from voicebus.telephony.rest import CarrierRest

TOKEN = "tok-9f8e7d6c5b4a"


@pytest.fixture
async def api() -> AsyncIterator[tuple[RunningCloudonixApi, httpx.AsyncClient]]:
    async with run_cloudonix_api({"acme": TOKEN}) as running, httpx.AsyncClient(trust_env=False) as http:
        yield running, http


def client(url: str, token: str, http: httpx.AsyncClient) -> CarrierRest:
    spec = get_spec("cloudonix")
    assert spec is not None and spec.rest is not None
    creds = spec.credentials_model.model_validate({"domain_id": "acme", "bearer_token": token})
    return spec.rest(creds, url, http)


def test_path_parts_are_encoded_and_the_token_stays_out_of_repr() -> None:
    c = CloudonixClient("https://api.example.test/", "acme.cloudonix.net", TOKEN, httpx.AsyncClient())
    assert c.session_url("a/b c?d") == (
        "https://api.example.test/customers/self/domains/acme.cloudonix.net/sessions/a%2Fb%20c%3Fd")
    assert TOKEN not in repr(c) and TOKEN not in str(vars(c).get("base_url"))
    with pytest.raises(CarrierError, match="no bearer_token") as e:
        CloudonixClient("https://x", "acme.cloudonix.net", "", httpx.AsyncClient())
    assert e.value.code == "carrier_auth_failed"
    with pytest.raises(ValueError):
        c.session_url("")


async def test_validate_and_hangup(api: tuple[RunningCloudonixApi, httpx.AsyncClient]) -> None:
    running, http = api
    running.state.add_session("acme", "s-1")
    c = client(running.url, TOKEN, http)
    assert await c.confirm_call("s-1") == (True, 200)
    assert await c.confirm_call("missing") == (False, 404)
    assert await c.hangup("s-1") == "hung_up"
    assert await c.hangup("s-1") == "already_ended"
    assert await c.confirm_call("s-1") == (False, 404)
    wrong = client(running.url, "nope", http)
    assert await wrong.confirm_call("s-1") == (False, 401)
    with pytest.raises(CarrierError) as e:
        await wrong.hangup("s-1")
    assert (e.value.code, e.value.status) == ("carrier_auth_failed", 401)


async def test_retries_and_token_never_logged(api: tuple[RunningCloudonixApi, httpx.AsyncClient],
                                              caplog: pytest.LogCaptureFixture) -> None:
    running, http = api
    running.state.add_session("acme", "s-2")
    c = client(running.url, TOKEN, http)
    caplog.set_level(logging.DEBUG)
    running.state.fail_next = [502, 503]
    assert await c.confirm_call("s-2") == (True, 200)
    running.state.fail_next = [500, 500, 500]
    with pytest.raises(CarrierError) as e:
        await c.hangup("s-2")
    assert e.value.code == "carrier_error" and e.value.status == 500 and "3 attempt" in e.value.message
    assert [(r.method, r.status) for r in running.state.sessions["s-2"].requests] == [
        ("GET", 502), ("GET", 503), ("GET", 200), ("DELETE", 500), ("DELETE", 500), ("DELETE", 500)]
    assert "attempt" in caplog.text
    assert TOKEN not in caplog.text and TOKEN not in str(e.value)


async def test_timeouts_stay_within_the_budget(api: tuple[RunningCloudonixApi, httpx.AsyncClient]) -> None:
    running, http = api
    running.state.add_session("acme", "s-3")
    running.state.delay_s = 2.0
    c = CloudonixClient(running.url, "acme.cloudonix.net", TOKEN, http, timeout_s=0.5, backoff_s=0.01,
                        confirm_budget_s=0.6)
    loop_time = asyncio.get_running_loop().time
    t0 = loop_time()
    with pytest.raises(CarrierError) as e:
        await c.confirm_call("s-3")
    elapsed = loop_time() - t0
    assert e.value.code == "carrier_error" and "timed out" in e.value.message
    assert 0.5 <= elapsed < 1.2  # three full attempts would take >= 1.5 s
