"""After every other end-to-end test has run: no service logged a secret.

The Agent Stream URL authorizes a call by itself (it carries the agent UUID), so neither it nor the
agent UUID may reach a log line; nor may a carrier secret (Cloudonix bearer token, Twilio auth token),
an admin API key, or a per-call media socket token (it would let a reader take over the call's audio).
"""

from __future__ import annotations

import re

from tests.e2e.conftest import E2E


def test_no_secret_in_any_service_log(e2e: E2E) -> None:
    log = (e2e.stack.cfg.home / "stack.log").read_text()
    for name in ("config", "call-control", "runner-1", "runner-2", "ingress"):
        assert f"{name:>12} | " in log, f"{name} logged nothing: the check below would prove nothing"
    assert e2e.agent_uuid not in log
    assert e2e.limited_org_agent_uuid not in log
    assert e2e.token not in log
    assert e2e.org.api_key not in log
    assert "provider=cloudonix" not in log
    assert e2e.twilio_token not in log
    media_tokens = {t for call in e2e.twilio.state.calls.values() for doc in call.twiml_docs
                    for t in re.findall(r'name="vb_token" value="([^"]+)"', doc["body"])}
    assert media_tokens, "no outbound call got TwiML with a media token: the check below would prove nothing"
    for token in media_tokens:
        assert token not in log
