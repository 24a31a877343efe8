"""The ``voicebus-ingress`` entry point as a real process: it serves health, and SIGTERM makes it exit cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httpx
import nats

from voicebus.cli.embedded import free_port, wait_for_port


async def test_entry_point_serves_and_stops_on_sigterm(nats_url: str, subject_prefix: str):
    port = free_port()
    env = {**os.environ, "NATS_URL": nats_url, "VOICEBUS_SUBJECT_PREFIX": subject_prefix,
           "VOICEBUS_INGRESS_PORT": str(port), "VOICEBUS_HTTP_HOST": "127.0.0.1", "LOG_LEVEL": "INFO"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "voicebus.ingress.main", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 20)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 15)
        assert proc.stdout is not None
        output = (await proc.stdout.read()).decode()
        assert code == 0, output
        assert "draining" in output and "ingress stopped" in output
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().delete_stream(f"{subject_prefix.upper()}_EVENTS")
        finally:
            await nc.close()
