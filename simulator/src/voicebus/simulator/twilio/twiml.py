"""TwiML as Twilio reads it, parsed here with ElementTree (never with voicebus's markup code).

Only the verbs voicebus answers with are interpreted; anything else is kept as :class:`Other` so a
report shows it instead of silently dropping it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


class TwimlError(ValueError):
    """Twilio's error 12100 (document parse failure) or 12200 (schema): the call cannot go on."""


@dataclass(frozen=True)
class Stream:
    url: str
    name: str = ""
    track: str = "inbound_track"
    status_callback: str = ""
    status_callback_method: str = "POST"
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Connect:
    stream: Stream | None
    other: tuple[str, ...] = ()


@dataclass(frozen=True)
class Say:
    text: str
    voice: str = ""
    language: str = ""


@dataclass(frozen=True)
class Pause:
    length_s: float = 1.0


@dataclass(frozen=True)
class Hangup:
    pass


@dataclass(frozen=True)
class Reject:
    reason: str = "rejected"


@dataclass(frozen=True)
class Redirect:
    url: str
    method: str = "POST"


@dataclass(frozen=True)
class Other:
    tag: str


Verb = Connect | Say | Pause | Hangup | Reject | Redirect | Other


def _stream(el: ET.Element) -> Stream:
    url = (el.get("url") or "").strip()
    if not url:
        raise TwimlError("<Stream> without a url attribute")
    if not url.startswith(("ws://", "wss://")):
        raise TwimlError(f"<Stream url> must be ws:// or wss://, got {url.split('?')[0]!r}")
    params: dict[str, str] = {}
    for p in el:
        if p.tag != "Parameter":
            raise TwimlError(f"<Stream> may hold only <Parameter>, got <{p.tag}>")
        name = p.get("name")
        if not name:
            raise TwimlError("<Parameter> without a name")
        params[name] = p.get("value", "")
    method = (el.get("statusCallbackMethod") or "POST").upper()
    if method not in ("GET", "POST"):
        raise TwimlError(f"<Stream statusCallbackMethod> must be GET or POST, got {method!r}")
    return Stream(url=url, name=el.get("name", ""), track=el.get("track", "inbound_track"),
                  status_callback=el.get("statusCallback", ""), status_callback_method=method, parameters=params)


def parse_twiml(text: str) -> list[Verb]:
    """The verbs of a ``<Response>`` document, in order."""
    try:
        root = ET.fromstring(text.strip())
    except ET.ParseError as e:
        raise TwimlError(f"not XML: {e}") from None
    if root.tag != "Response":
        raise TwimlError(f"the root element must be <Response>, got <{root.tag}>")
    verbs: list[Verb] = []
    for el in root:
        if el.tag == "Connect":
            streams = [c for c in el if c.tag == "Stream"]
            if len(streams) > 1:
                raise TwimlError("<Connect> holds more than one <Stream>")
            verbs.append(Connect(_stream(streams[0]) if streams else None,
                                 tuple(c.tag for c in el if c.tag != "Stream")))
        elif el.tag == "Say":
            verbs.append(Say((el.text or "").strip(), el.get("voice", ""), el.get("language", "")))
        elif el.tag == "Pause":
            try:
                length = float(el.get("length", "1"))
            except ValueError:
                raise TwimlError(f"<Pause length> must be a number, got {el.get('length')!r}") from None
            verbs.append(Pause(max(0.0, length)))
        elif el.tag == "Hangup":
            verbs.append(Hangup())
        elif el.tag == "Reject":
            verbs.append(Reject(el.get("reason", "rejected")))
        elif el.tag == "Redirect":
            verbs.append(Redirect((el.text or "").strip(), (el.get("method") or "POST").upper()))
        else:
            verbs.append(Other(el.tag))
    return verbs


def describe(verb: Verb) -> str:
    if isinstance(verb, Connect):
        if verb.stream is None:
            return "<Connect> without <Stream>"
        names = ", ".join(sorted(verb.stream.parameters)) or "none"
        return f"<Connect><Stream url={verb.stream.url.split('?')[0]}> parameters: {names}"
    if isinstance(verb, Say):
        return f"<Say> {verb.text!r}"
    if isinstance(verb, Pause):
        return f"<Pause length={verb.length_s:g}>"
    if isinstance(verb, Redirect):
        return f"<Redirect> {verb.url}"
    if isinstance(verb, Reject):
        return f"<Reject reason={verb.reason}>"
    return f"<{type(verb).__name__ if not isinstance(verb, Other) else verb.tag}>"
