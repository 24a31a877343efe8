"""Cut an arbitrary byte stream into fixed-size frames (carriers send odd sizes; the bus wants 20 ms)."""

from __future__ import annotations


def frame_bytes(sample_rate: int, frame_ms: int = 20, sample_width: int = 2) -> int:
    return sample_rate * frame_ms // 1000 * sample_width


class FrameCutter:
    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("frame size must be positive")
        self.size = size
        self._buf = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        self._buf.extend(data)
        n = len(self._buf) // self.size
        out = [bytes(self._buf[i * self.size:(i + 1) * self.size]) for i in range(n)]
        del self._buf[: n * self.size]
        return out

    def flush(self, pad: bytes = b"\x00") -> bytes | None:
        """Return the partial tail padded to a whole frame (silence for PCM16), or None if empty."""
        if not self._buf:
            return None
        tail = bytes(self._buf) + pad * (self.size - len(self._buf))
        self._buf.clear()
        return tail

    def __len__(self) -> int:
        return len(self._buf)
