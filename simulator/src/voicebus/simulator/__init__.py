"""Carrier simulator: dials Agent Stream like a carrier; REST stand-ins for carriers and LLMs."""
