"""Twilio's cloud, played for voicebus: everything Twilio does around a call, from Twilio's documentation.

- ``signing``: ``X-Twilio-Signature`` on every request Twilio makes (webhooks, status callbacks, the
  media-socket upgrade), computed by the official ``twilio`` SDK, never by voicebus's verifier.
- ``twiml``: reads the TwiML voicebus answers (``<Connect><Stream>``, ``<Say>``, ``<Hangup>``, ...).
- ``stream``: the Media Streams socket a ``<Stream>`` names: signed upgrade, ``connected``/``start``
  with the ``<Parameter>`` values, the phone (:mod:`voicebus.simulator.phone`), Stream status callbacks.
- ``dial``: an inbound call: the signed voice webhook to voicebus, then the TwiML it answers.
- ``rest``: the REST API stand-in (Calls create/fetch/update, IncomingPhoneNumbers); a created call
  rings, is answered (or busy, no-answer, failed), fetches its ``Url`` and follows the TwiML.
"""
