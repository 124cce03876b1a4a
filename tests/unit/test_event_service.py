"""The event service: typed methods, correlation and causation, and a publisher built once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from uuid import uuid4

import pytest

from forge.core.events.context import caused_by, correlation_scope, current_causation
from forge.core.events.ports import EventPublisher
from forge.core.events.service import EventService
from forge.core.privacy import PersonalDataProtector
from forge.exceptions import EventValidationError, PublishError, StorageUnavailableError
from forge.models.events import Event, EventType, UserAuthenticatedEvent, UserRegisteredEvent
from tests.helpers import capsule_created, vote_cast


class MemoryPublisher:
    """A publisher that keeps what it is given, for tests of code above the port."""

    def __init__(self) -> None:
        self.published: list[Event[Any]] = []
        self.started = 0
        self.stopped = 0

    async def start(self) -> None:
        self.started += 1

    async def stop(self) -> None:
        self.stopped += 1

    async def publish(self, event: Event[Any]) -> None:
        self.published.append(event)

    async def publish_batch(self, events: Sequence[Event[Any]]) -> None:
        self.published.extend(events)


@pytest.fixture
def publisher() -> MemoryPublisher:
    return MemoryPublisher()


@pytest.fixture
def service(publisher: MemoryPublisher) -> EventService:
    return EventService(publisher)


def test_memory_publisher_fits_port() -> None:
    assert isinstance(MemoryPublisher(), EventPublisher)


async def test_typed_method_publishes_typed_event(
    service: EventService, publisher: MemoryPublisher
) -> None:
    user_id = uuid4()

    returned = await service.user_registered(user_id, "ada")

    assert publisher.published == [returned]
    assert type(returned) is UserRegisteredEvent
    assert returned.resource_id == user_id


@pytest.mark.parametrize("event_type", list(EventType), ids=lambda t: t.value)
def test_service_has_method_per_type(event_type: EventType) -> None:
    assert callable(getattr(EventService, event_type.name.lower(), None))


async def test_caused_by_stamps_trigger_correlation(
    service: EventService, publisher: MemoryPublisher
) -> None:
    trigger = capsule_created(correlation_id=uuid4())

    with caused_by(trigger):
        published = await service.publish(vote_cast())

    assert published.correlation_id == trigger.correlation_id
    assert published.causation_id == trigger.id
    assert publisher.published == [published]


async def test_caused_by_uses_trigger_id(service: EventService) -> None:
    trigger = capsule_created()

    with caused_by(trigger):
        published = await service.publish(vote_cast())

    assert published.correlation_id == trigger.id
    assert published.causation_id == trigger.id


async def test_explicit_ids_not_overwritten(service: EventService) -> None:
    own_correlation, own_causation = uuid4(), uuid4()
    event = vote_cast().model_copy(
        update={"correlation_id": own_correlation, "causation_id": own_causation}
    )

    with caused_by(capsule_created()):
        published = await service.publish(event)

    assert published.correlation_id == own_correlation
    assert published.causation_id == own_causation


async def test_correlation_scope_stamps_correlation(service: EventService) -> None:
    correlation_id = uuid4()

    with correlation_scope(correlation_id):
        first = await service.publish(vote_cast())
        second = await service.capsule_searched(None, "kafka", 3)

    assert first.correlation_id == correlation_id
    assert second.correlation_id == correlation_id
    assert first.causation_id is None


async def test_scope_ends_with_block(service: EventService) -> None:
    with correlation_scope(uuid4()):
        pass

    published = await service.publish(vote_cast())

    assert published.correlation_id is None
    assert current_causation() is None


async def test_nested_scope_restores_outer(service: EventService) -> None:
    outer = uuid4()

    with correlation_scope(outer):
        with caused_by(capsule_created()):
            pass
        published = await service.publish(vote_cast())

    assert published.correlation_id == outer


async def test_scope_isolated_between_tasks(service: EventService) -> None:
    correlation_id = uuid4()
    inside: list[Event[Any]] = []
    outside: list[Event[Any]] = []
    entered = asyncio.Event()
    published = asyncio.Event()

    async def in_scope() -> None:
        with correlation_scope(correlation_id):
            entered.set()
            await published.wait()
            inside.append(await service.publish(vote_cast()))

    async def out_of_scope() -> None:
        await entered.wait()
        outside.append(await service.publish(vote_cast()))
        published.set()

    await asyncio.gather(in_scope(), out_of_scope())

    assert inside[0].correlation_id == correlation_id
    assert outside[0].correlation_id is None


async def test_publish_many_stamps_every_event(
    service: EventService, publisher: MemoryPublisher
) -> None:
    trigger = capsule_created()

    with caused_by(trigger):
        published = await service.publish_many([vote_cast(), vote_cast()])

    assert [event.causation_id for event in published] == [trigger.id, trigger.id]
    assert publisher.published == published


async def test_factory_called_once_under_race() -> None:
    publisher = MemoryPublisher()
    calls = 0

    async def build() -> EventPublisher:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        await publisher.start()
        return publisher

    service = EventService(publisher_factory=build)

    await asyncio.gather(*(service.publish(vote_cast()) for _ in range(10)))

    assert calls == 1
    assert publisher.started == 1
    assert len(publisher.published) == 10


async def test_concurrent_initialize_returns_same_publisher() -> None:
    async def build() -> EventPublisher:
        await asyncio.sleep(0.01)
        return MemoryPublisher()

    service = EventService(publisher_factory=build)

    publishers = await asyncio.gather(*(service.initialize() for _ in range(10)))

    assert len({id(publisher) for publisher in publishers}) == 1


async def test_close_stops_factory_publisher() -> None:
    publisher = MemoryPublisher()

    async def build() -> EventPublisher:
        return publisher

    service = EventService(publisher_factory=build)
    await service.publish(vote_cast())

    await service.close()

    assert publisher.stopped == 1


async def test_close_leaves_given_publisher(
    service: EventService, publisher: MemoryPublisher
) -> None:
    await service.close()

    assert publisher.stopped == 0


def test_service_needs_publisher() -> None:
    with pytest.raises(ValueError, match="needs a publisher or a publisher_factory"):
        EventService()


class _UnreachableKeys:
    """A subject key store whose database is down."""

    async def key_for(self, subject_id: Any, *, create: bool) -> bytes | None:
        raise StorageUnavailableError("Cannot reach PostgreSQL at ... (connection refused).")

    async def forget(self, subject_id: Any) -> bool:
        raise StorageUnavailableError("Cannot reach PostgreSQL at ... (connection refused).")


def _sign_in() -> Event[Any]:
    user = uuid4()
    return UserAuthenticatedEvent.create(user_id=user, ip_address="198.51.100.7")


@pytest.mark.parametrize("many", [False, True], ids=["publish", "publish_many"])
async def test_unreachable_key_store_raises_publish_error(
    publisher: MemoryPublisher, many: bool
) -> None:
    service = EventService(publisher, protector=PersonalDataProtector(_UnreachableKeys()))

    with pytest.raises(PublishError) as caught:
        if many:
            await service.publish_many([_sign_in()])
        else:
            await service.publish(_sign_in())

    assert caught.value.retriable is True
    assert "could not be read or stored, so nothing was published" in str(caught.value)
    assert publisher.published == []


async def test_repeated_ids_named(publisher: MemoryPublisher, service: EventService) -> None:
    event = vote_cast()

    with pytest.raises(EventValidationError, match=f"Event id {event.id} appears twice"):
        await service.publish_many([event, vote_cast(), event])

    assert publisher.published == []
