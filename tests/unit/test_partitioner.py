"""The producer's murmur2 partitioner against aiokafka's, which follows Kafka's Java client."""

from __future__ import annotations

import random
import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from forge.infrastructure.kafka.partitioner import murmur2, murmur2_many, partition_of_key

# Hashes of Kafka's Java client as signed 32-bit integers; aiokafka gives the same ones.
JAVA_HASHES = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]


def _signed(value: int) -> int:
    return value - 2**32 if value >= 2**31 else value


@pytest.mark.parametrize(("data", "expected"), JAVA_HASHES)
def test_murmur2_matches_java_client(data: bytes, expected: int) -> None:
    assert _signed(murmur2(data)) == expected
    assert _signed(aiokafka_murmur2(data)) == expected


def test_murmur2_matches_aiokafka_on_random_bytes() -> None:
    generator = random.Random(7)
    for length in range(0, 81):
        for _ in range(50):
            data = generator.randbytes(length)
            assert murmur2(data) == aiokafka_murmur2(data), data


def test_partition_matches_default_partitioner() -> None:
    partitioner = DefaultPartitioner()
    generator = random.Random(11)
    for _ in range(2_000):
        key = str(uuid.UUID(int=generator.getrandbits(128))).encode()
        partitions = list(range(generator.randint(1, 12)))
        assert partition_of_key(key, partitions) == partitioner(key, partitions, partitions)


def test_murmur2_many_matches_murmur2() -> None:
    generator = random.Random(5)
    # Lengths 0 to 40, each key count from 1 (hashed alone) to 30 (hashed together), mixed.
    keys = [
        generator.randbytes(length) for length in range(41) for _ in range(generator.randint(1, 30))
    ]
    generator.shuffle(keys)

    assert murmur2_many(keys) == [murmur2(key) for key in keys]


def test_murmur2_many_of_resource_ids() -> None:
    keys = [str(uuid.uuid4()).encode() for _ in range(500)]

    assert murmur2_many(keys) == [aiokafka_murmur2(key) for key in keys]


def test_murmur2_many_of_extreme_words() -> None:
    keys = [bytes([value]) * length for value in (0, 0xFF) for length in (4, 5, 7, 36)] * 4

    assert murmur2_many(keys) == [murmur2(key) for key in keys]
