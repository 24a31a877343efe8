"""voicebus bus contracts.

Every subject and message schema that crosses a service boundary lives here and nowhere else, so a
change to a contract is a change to one file that every service picks up. See docs/bus-contracts.md.
"""

from voicebus.bus.subjects import Subjects

__all__ = ["Subjects"]
