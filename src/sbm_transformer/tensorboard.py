"""A dependency-free TensorBoard scalar writer (and reader, for tests).

TensorBoard reads ``events.out.tfevents.*`` files: TFRecord-framed ``Event`` protocol buffers.
Scalars need only a handful of fields, so they are encoded by hand here instead of pulling in the
``tensorboard`` package (and its protobuf/grpc stack) as a dependency. Open the run directory with
``tensorboard --logdir RUN_DIR`` wherever TensorBoard is installed.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

_CRC_TABLE: list[int] = []


def _crc32c(data: bytes) -> int:
    if not _CRC_TABLE:
        for i in range(256):
            crc = i
            for _ in range(8):
                crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
            _CRC_TABLE.append(crc)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(
    step: int, wall_time: float, *, summary: bytes | None = None, version: str | None = None
) -> bytes:
    msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if version is not None:
        msg += _field_bytes(3, version.encode())
    if summary is not None:
        msg += _field_bytes(5, summary)
    return msg


def _scalar_summary(tag: str, value: float) -> bytes:
    inner = _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
    return _field_bytes(1, inner)


class ScalarWriter:
    """Append scalars to a TensorBoard event file in ``logdir``.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with ScalarWriter(d) as w:
        ...         w.add_scalar("loss/train", 0.5, step=10)
        ...     read_scalars(d)
        [('loss/train', 10, 0.5)]
    """

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = self.logdir / name
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._write(_event(0, time.time(), version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc(header)))
        self._file.write(data + struct.pack("<I", _masked_crc(data)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(_event(step, time.time(), summary=_scalar_summary(tag, float(value))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, object]]:
    out: list[tuple[int, int, object]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: object
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, wire, value))
    return out


def read_scalars(logdir: str | Path) -> list[tuple[str, int, float]]:
    """All ``(tag, step, value)`` scalars of the event files in ``logdir``, checking CRCs."""
    scalars = []
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            if struct.unpack("<I", data[pos + 8 : pos + 12])[0] != _masked_crc(header):
                raise ValueError(f"{path}: corrupt record header at byte {pos}")
            record = data[pos + 12 : pos + 12 + length]
            if struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] != _masked_crc(
                record
            ):
                raise ValueError(f"{path}: corrupt record at byte {pos}")
            pos += 16 + length
            step = 0
            for number, _, value in _fields(record):
                if number == 2:
                    step = int(value)  # type: ignore[call-overload]
                elif number == 5:
                    for _, _, item in _fields(value):  # type: ignore[arg-type]
                        tag, val = "", 0.0
                        for n2, _, v2 in _fields(item):  # type: ignore[arg-type]
                            if n2 == 1:
                                tag = bytes(v2).decode()  # type: ignore[call-overload]
                            elif n2 == 2:
                                val = struct.unpack("<f", v2)[0]  # type: ignore[arg-type]
                        scalars.append((tag, step, val))
    return scalars
