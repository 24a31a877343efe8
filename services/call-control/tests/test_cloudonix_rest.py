"""The Cloudonix REST client against the stand-in over real HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from voicebus.simulator.cloudonix_api import RunningCloudonixApi, run_cloudonix_api
from voicebus.telephony.providers.cloudonix.rest import CarrierError, CloudonixClient

TOKEN = "tok-9f8e7d6c5b4a"


@pytest.fixture
async def api() -> AsyncIterator[tuple[RunningCloudonixApi, httpx.AsyncClient]]:
    async with run_cloudonix_api({"acme": TOKEN}) as running, httpx.AsyncClient(trust_env=False) as http:
        yield running, http


def test_path_parts_are_encoded_and_the_token_stays_out_of_repr() -> None:
    c = CloudonixClient("https://api.example.test/", TOKEN, httpx.AsyncClient())
    assert c.session_url("acme.cloudonix.net", "a/b c?d") == (
        "https://api.example.test/customers/self/domains/acme.cloudonix.net/sessions/a%2Fb%20c%3Fd")
    assert TOKEN not in repr(c) and TOKEN not in str(vars(c).get("base_url"))
    with pytest.raises(ValueError, match="bearer token"):
        CloudonixClient("https://x", "", httpx.AsyncClient())
    with pytest.raises(ValueError):
        c.session_url("acme", "")


async def test_validate_and_hangup(api: tuple[RunningCloudonixApi, httpx.AsyncClient]) -> None:
    running, http = api
    running.state.add_session("acme", "s-1")
    c = CloudonixClient(running.url, TOKEN, http, backoff_s=0.01)
    assert await c.validate_session("acme.cloudonix.net", "s-1") == (True, 200)
    assert await c.validate_session("acme.cloudonix.net", "missing") == (False, 404)
    assert await c.hangup("acme.cloudonix.net", "s-1") == ("hung_up", 204)
    assert await c.hangup("acme.cloudonix.net", "s-1") == ("already_ended", 404)
    assert await c.validate_session("acme.cloudonix.net", "s-1") == (False, 404)
    wrong = CloudonixClient(running.url, "nope", http)
    assert await wrong.validate_session("acme.cloudonix.net", "s-1") == (False, 401)
    with pytest.raises(CarrierError) as e:
        await wrong.hangup("acme.cloudonix.net", "s-1")
    assert (e.value.code, e.value.status) == ("carrier_auth_failed", 401)


async def test_retries_and_token_never_logged(api: tuple[RunningCloudonixApi, httpx.AsyncClient],
                                              caplog: pytest.LogCaptureFixture) -> None:
    running, http = api
    running.state.add_session("acme", "s-2")
    c = CloudonixClient(running.url, TOKEN, http, backoff_s=0.01)
    caplog.set_level(logging.DEBUG)
    running.state.fail_next = [502, 503]
    assert await c.validate_session("acme.cloudonix.net", "s-2") == (True, 200)
    running.state.fail_next = [500, 500, 500]
    with pytest.raises(CarrierError) as e:
        await c.hangup("acme.cloudonix.net", "s-2")
    assert e.value.code == "carrier_error" and e.value.status == 500 and "3 attempt" in e.value.message
    assert [(r.method, r.status) for r in running.state.sessions["s-2"].requests] == [
        ("GET", 502), ("GET", 503), ("GET", 200), ("DELETE", 500), ("DELETE", 500), ("DELETE", 500)]
    assert "attempt" in caplog.text
    assert TOKEN not in caplog.text and TOKEN not in str(e.value)


async def test_timeouts_stay_within_the_budget(api: tuple[RunningCloudonixApi, httpx.AsyncClient]) -> None:
    running, http = api
    running.state.add_session("acme", "s-3")
    running.state.delay_s = 2.0
    c = CloudonixClient(running.url, TOKEN, http, timeout_s=0.5, backoff_s=0.01, validate_budget_s=0.6)
    loop_time = asyncio.get_running_loop().time
    t0 = loop_time()
    with pytest.raises(CarrierError) as e:
        await c.validate_session("acme.cloudonix.net", "s-3")
    elapsed = loop_time() - t0
    assert e.value.code == "carrier_error" and "timed out" in e.value.message
    assert 0.5 <= elapsed < 1.2  # three full attempts would take >= 1.5 s
