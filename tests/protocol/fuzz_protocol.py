"""Coverage-guided fuzzing of the frame reader and message decoding (atheris).

Run by tests/protocol/test_fuzz.py where atheris installs; by hand:
    python tests/protocol/fuzz_protocol.py -runs=1000000 -max_len=8192 \
        tests/protocol/fuzz_corpus
An input is one byte for the chunk size, one for the role (low bit: 0 server,
1 client), then the bytes that arrive; tests/fuzz_corpus holds valid frames to
start from and every input that once broke the decoder. Anything but a protocol
error or a valid message is a crash.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from stigmer.broker.protocol import CLOSED, NEED_DATA, Connection, Role
    from stigmer.broker.protocol.connection import one_line
    from stigmer.broker.protocol.errors import BrokerError

MAX_FRAME = 4096


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    chunk = 1 + data[0] % 64
    role = Role.CLIENT if data[1] & 1 else Role.SERVER
    stream = data[2:]
    conn = Connection(role, max_frame_size=MAX_FRAME)
    try:
        for i in range(0, len(stream), chunk):
            conn.receive_data(stream[i:i + chunk])
            while (event := conn.next_event()) is not NEED_DATA:
                if event is CLOSED:
                    return
        conn.receive_data(b"")
        conn.next_event()
    except BrokerError as exc:
        refusal = exc.message
    else:
        return
    finally:
        # memory never grows with what a header claims: at most one frame and a chunk
        assert conn.buffered <= MAX_FRAME + 4 + 64
    # told to the peer and logged: it must stay on one line
    assert refusal == one_line(refusal), refusal


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
