"""Telephony providers: one package per carrier (wire framing, handshake, REST client)."""
