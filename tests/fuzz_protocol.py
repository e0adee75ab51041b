"""Coverage-guided fuzzing of the frame reader and message decoding (atheris).

Run by tests/test_fuzz.py where atheris installs; by hand:
    python tests/fuzz_protocol.py -runs=1000000 -max_len=8192
Anything but a protocol error or a valid message is a crash.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from stigmer.broker.protocol import CLOSED, NEED_DATA, Connection, Role
    from stigmer.broker.protocol.errors import BrokerError

MAX_FRAME = 4096


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    chunk = provider.ConsumeIntInRange(1, 64)
    role = Role.SERVER if provider.ConsumeBool() else Role.CLIENT
    stream = provider.ConsumeBytes(len(data))
    conn = Connection(role, max_frame_size=MAX_FRAME)
    try:
        for i in range(0, len(stream), chunk):
            conn.receive_data(stream[i:i + chunk])
            while (event := conn.next_event()) is not NEED_DATA:
                if event is CLOSED:
                    return
        conn.receive_data(b"")
        conn.next_event()
    except BrokerError:
        return
    finally:
        # memory never grows with what a header claims: at most one frame and a chunk
        assert conn.buffered <= MAX_FRAME + 4 + 64


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
