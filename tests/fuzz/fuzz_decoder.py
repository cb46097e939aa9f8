"""Long-running random + mutation fuzz loop for the MQTT decoder (`make fuzz`).

    python tests/fuzz/fuzz_decoder.py --seconds 60 [--seed N]

Each round builds an input (random bytes, or a valid CONNECT plus packets encoded by the codec and
then mutated), feeds it to a fresh `Decoder` in random chunks, and checks that:
- only `MQTTError` subclasses come out;
- no single input takes longer than `--hang-seconds` (a SIGALRM interrupts it);
- packets that did decode survive encode -> decode unchanged.
On a violation it prints the seed, version, chunks (hex) and traceback and exits 1; otherwise it
prints counts and exits 0. Plain `random`, no hypothesis, so it runs anywhere the broker runs.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import time
import traceback
from itertools import pairwise
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from broker.protocol.codec import Decoder, encode
from broker.protocol.errors import MQTTError
from broker.protocol.packets import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    ProtocolVersion,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)

MAX_PACKET_BYTES = 8192
V5 = ProtocolVersion.V5


class Hang(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang("decoder took too long on one input")


def text(rng: random.Random) -> str:
    pool = "abc/+#$ é中\U0001f600"
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 8)))


def props(rng: random.Random, kind: str) -> Properties:
    if rng.random() < 0.5:
        return Properties()
    user = tuple((text(rng), text(rng)) for _ in range(rng.randint(0, 2)))
    if kind == "publish":
        return Properties(
            payload_format_indicator=rng.choice([None, 0, 1]),
            message_expiry_interval_s=rng.choice([None, rng.randint(0, 2**32 - 1)]),
            content_type=rng.choice([None, text(rng)]),
            correlation_data=rng.choice([None, rng.randbytes(rng.randint(0, 6))]),
            subscription_identifiers=tuple(rng.randint(1, 268_435_455) for _ in range(rng.randint(0, 2))),
            topic_alias=rng.choice([None, rng.randint(1, 10)]),
            user_properties=user,
        )
    if kind == "connect":
        return Properties(
            session_expiry_interval_s=rng.choice([None, rng.randint(0, 2**32 - 1)]),
            receive_maximum=rng.choice([None, rng.randint(1, 65535)]),
            maximum_packet_bytes=rng.choice([None, rng.randint(1, 2**32 - 1)]),
            authentication_method=rng.choice([None, text(rng)]),
            user_properties=user,
        )
    if kind == "will":
        return Properties(will_delay_interval_s=rng.choice([None, 5]), user_properties=user)
    if kind == "subscribe":
        return Properties(
            subscription_identifiers=tuple(rng.randint(1, 999) for _ in range(rng.randint(0, 1))),
            user_properties=user,
        )
    return Properties(reason_string=rng.choice([None, text(rng)]), user_properties=user)


def valid_connect(rng: random.Random, version: ProtocolVersion) -> Connect:
    v5 = version == V5
    will = None
    if rng.random() < 0.5:
        will_props = props(rng, "will") if v5 else Properties()
        will = Will(
            text(rng), rng.randbytes(rng.randint(0, 5)), rng.randint(0, 2), rng.random() < 0.5, will_props
        )
    username = rng.choice([None, text(rng)])
    password = rng.choice([None, b"pw"]) if (v5 or username is not None) else None
    return Connect(
        text(rng),
        version,
        rng.random() < 0.5,
        rng.randint(0, 65535),
        will,
        username,
        password,
        props(rng, "connect") if v5 else Properties(),
    )


def valid_packet(rng: random.Random, v5: bool) -> Packet:
    pid = rng.randint(1, 65535)

    def p(kind: str) -> Properties:
        return props(rng, kind) if v5 else Properties()

    code = rng.choice([0, 0x10, 0x80, 0x97]) if v5 else 0
    choice = rng.randrange(14)
    if choice < 4:
        qos = rng.randint(0, 2)
        dup = qos > 0 and rng.random() < 0.5
        payload = rng.randbytes(rng.randint(0, 40))
        return Publish(text(rng), payload, qos, rng.random() < 0.5, dup, pid if qos else 0, p("publish"))
    if choice == 4:
        return Puback(pid, code, p("ack"))
    if choice == 5:
        return Pubrec(pid, code, p("ack"))
    if choice == 6:
        return Pubrel(pid, code, p("ack"))
    if choice == 7:
        return Pubcomp(pid, code, p("ack"))
    if choice == 8:
        subs = tuple(
            Subscription(text(rng), rng.randint(0, 2))
            if not v5
            else Subscription(
                text(rng), rng.randint(0, 2), rng.random() < 0.5, rng.random() < 0.5, rng.randint(0, 2)
            )
            for _ in range(rng.randint(1, 3))
        )
        return Subscribe(pid, subs, p("subscribe"))
    if choice == 9:
        return Unsubscribe(pid, tuple(text(rng) for _ in range(rng.randint(1, 3))), p("unsubscribe"))
    if choice == 10:
        small: list[Packet] = [Pingreq(), Pingresp(), Connack(rng.random() < 0.5, code, p("ack"))]
        return rng.choice(small)
    if choice == 11:
        return Suback(pid, tuple(rng.choice([0, 1, 2, 0x80]) for _ in range(rng.randint(1, 3))), p("ack"))
    if choice == 12:
        return Unsuback(pid, (0,) if v5 else (), p("ack"))
    return Auth(0x18, Properties(authentication_method="m")) if v5 else Disconnect()


def mutate(rng: random.Random, data: bytes) -> bytes:
    wire = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(wire)) if wire else 0
        op = rng.randrange(5)
        if op == 0 and wire:
            wire[at] ^= 1 << rng.randrange(8)
        elif op == 1 and wire:
            wire[at] = rng.choice([0x00, 0x01, 0x02, 0x03, 0x0B, 0x26, 0x7F, 0x80, 0xFF])
        elif op == 2:
            wire[at:at] = rng.randbytes(rng.randint(1, 4))
        elif op == 3 and wire:
            del wire[at : at + rng.randint(1, 4)]
        elif wire:  # duplicate a slice: repeated properties, repeated fields
            end = min(len(wire), at + rng.randint(1, 8))
            wire[at:at] = wire[at:end]
    if rng.random() < 0.2:
        wire = wire[: rng.randint(0, len(wire))]
    return bytes(wire)


def make_input(rng: random.Random) -> tuple[ProtocolVersion | None, list[bytes]]:
    version = rng.choice([ProtocolVersion.V311, V5, ProtocolVersion.V31])
    if rng.random() < 0.25:
        data = rng.randbytes(rng.randint(0, 200))
        if rng.random() < 0.5:  # a plausible first byte makes the body decoders work harder
            data = (
                bytes((rng.choice([0x10, 0x30, 0x32, 0x62, 0x82, 0xA2, 0xE0, 0xF0]), rng.randint(0, 127)))
                + data
            )
    else:
        packets: list[Packet] = [valid_connect(rng, version)]
        packets += [valid_packet(rng, version == V5) for _ in range(rng.randint(0, 5))]
        data = mutate(rng, b"".join(encode(pkt, version) for pkt in packets))
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 4)))
    edges = [0, *cuts, len(data)]
    chunks = [data[a:b] for a, b in pairwise(edges)]
    return rng.choice([None, None, version]), chunks


def check(version: ProtocolVersion | None, chunks: list[bytes]) -> bool:
    """Run one input; return True if it decoded without error. Raises on a codec bug."""
    decoder = Decoder(max_packet_bytes=MAX_PACKET_BYTES, version=version)
    out: list[Packet] = []
    try:
        for chunk in chunks:
            out.extend(decoder.feed(chunk))
            if decoder.buffered_bytes > MAX_PACKET_BYTES + len(chunk):
                raise AssertionError(f"decoder buffers {decoder.buffered_bytes} bytes")
    except MQTTError:
        return False
    if decoder.version is not None:
        for packet in out:
            packet_version = packet.protocol_version if isinstance(packet, Connect) else decoder.version
            again = Decoder(version=decoder.version).feed(encode(packet, packet_version))
            if again != [packet]:
                raise AssertionError(f"re-encoding changed {packet!r} into {again!r}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed for a reproducible run")
    parser.add_argument("--hang-seconds", type=float, default=5.0, help="limit for one input")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    signal.signal(signal.SIGALRM, _alarm)
    deadline = time.monotonic() + args.seconds
    rounds = decoded = 0
    while time.monotonic() < deadline:
        version, chunks = make_input(rng)
        signal.setitimer(signal.ITIMER_REAL, args.hang_seconds)
        try:
            decoded += check(version, chunks)
        except Exception:
            signal.setitimer(signal.ITIMER_REAL, 0)
            print(f"FAIL after {rounds} rounds (seed {seed}), decoder version {version!r}")
            print("chunks:", [c.hex() for c in chunks])
            traceback.print_exc(file=sys.stdout)
            return 1
        signal.setitimer(signal.ITIMER_REAL, 0)
        rounds += 1
    print(f"ok: {rounds} inputs in {args.seconds:.0f} s (seed {seed}), {decoded} decoded without error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
