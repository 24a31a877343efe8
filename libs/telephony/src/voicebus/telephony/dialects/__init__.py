"""Wire dialects that several carriers share, each written once (a provider package composes them).

- ``twilio_media``: Twilio Media Streams framing (JSON text frames, base64 mu-law 8 kHz), spoken by
  Twilio and Cloudonix; ``twilio_media_carrier`` is the carrier's side of it, for simulators and tests.
"""
