"""The voicebus command: embedded stack (up) and the demo call."""
