"""Stateless carrier edge: WebSockets and webhooks onto NATS."""
