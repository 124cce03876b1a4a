"""PostgreSQL stores of the distributed backend: capsules with their outbox, audit trail, dead
letters, inbox and personal-data keys, with the same classes as the embedded SQLite backend."""

from forge.infrastructure.postgres.audit_store import PostgresAuditStore
from forge.infrastructure.postgres.capsule_store import PostgresCapsuleStore
from forge.infrastructure.postgres.database import PostgresDatabase
from forge.infrastructure.postgres.dead_letters import PostgresDeadLetterStore
from forge.infrastructure.postgres.inbox import PostgresInbox
from forge.infrastructure.postgres.outbox import PostgresOutbox
from forge.infrastructure.postgres.subject_keys import PostgresSubjectKeyStore

__all__ = [
    "PostgresAuditStore",
    "PostgresCapsuleStore",
    "PostgresDatabase",
    "PostgresDeadLetterStore",
    "PostgresInbox",
    "PostgresOutbox",
    "PostgresSubjectKeyStore",
]
