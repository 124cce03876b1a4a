"""Schema of the PostgreSQL stores, upgraded in place through a version table.

Every table lives in one PostgreSQL schema (`public` unless the database is opened with another
one), so several Forge deployments, or tests, can share a database without seeing each other.
"""

from __future__ import annotations

from typing import Any

from forge.logging import get_logger

logger = get_logger(__name__)

VERSION_TABLE = "forge_schema_migrations"

MIGRATIONS: list[str] = [
    # 1: capsules, outbox, inbox, audit trail, dead letters, keys that seal personal data
    """
    CREATE TABLE capsules (
        id uuid PRIMARY KEY,
        owner_id uuid NOT NULL,
        capsule_type text NOT NULL,
        title text NOT NULL,
        content text NOT NULL,
        parent_id uuid,
        version text NOT NULL,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        deleted_at timestamptz
    );
    CREATE INDEX capsules_by_parent ON capsules (parent_id);
    CREATE INDEX capsules_by_owner ON capsules (owner_id, created_at);

    CREATE TABLE outbox (
        id bigserial PRIMARY KEY,
        topic text NOT NULL,
        key text,
        value bytea NOT NULL,
        headers jsonb NOT NULL DEFAULT '{}'::jsonb,
        event_id uuid NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        published_at timestamptz,
        rejected_at timestamptz,
        last_error text
    );
    CREATE INDEX outbox_pending ON outbox (id)
        WHERE published_at IS NULL AND rejected_at IS NULL;
    CREATE INDEX outbox_by_published_at ON outbox (published_at)
        WHERE published_at IS NOT NULL;

    CREATE TABLE inbox (
        group_id text NOT NULL,
        event_id uuid NOT NULL,
        event_type text NOT NULL,
        handled_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (group_id, event_id)
    );
    CREATE INDEX inbox_by_handled_at ON inbox (handled_at);

    CREATE TABLE audit_trail (
        seq bigserial PRIMARY KEY,
        event_id uuid NOT NULL UNIQUE,
        event_type text NOT NULL,
        occurred_at timestamptz NOT NULL,
        actor_id uuid,
        actor_type text NOT NULL,
        resource_type text,
        resource_id uuid,
        correlation_id uuid,
        causation_id uuid,
        event_json text NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX audit_by_time ON audit_trail (occurred_at, seq);
    CREATE INDEX audit_by_resource ON audit_trail (resource_id, occurred_at, seq);
    CREATE INDEX audit_by_actor ON audit_trail (actor_id, occurred_at, seq);
    CREATE INDEX audit_by_type ON audit_trail (event_type, occurred_at, seq);
    CREATE INDEX audit_by_correlation ON audit_trail (correlation_id, occurred_at, seq);
    CREATE FUNCTION audit_trail_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'the audit trail is append-only: % on audit_trail is not allowed', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END;
    $$;
    CREATE TRIGGER audit_trail_append_only BEFORE UPDATE OR DELETE ON audit_trail
        FOR EACH ROW EXECUTE FUNCTION audit_trail_reject_change();
    CREATE TRIGGER audit_trail_no_truncate BEFORE TRUNCATE ON audit_trail
        FOR EACH STATEMENT EXECUTE FUNCTION audit_trail_reject_change();

    CREATE TABLE dead_letters (
        id bigserial PRIMARY KEY,
        group_id text NOT NULL,
        topic text NOT NULL,
        partition integer NOT NULL,
        log_offset bigint NOT NULL,
        key text,
        value bytea NOT NULL,
        headers jsonb NOT NULL,
        event_id text,
        event_type text,
        reason text NOT NULL,
        error_type text NOT NULL,
        handler text NOT NULL,
        attempts integer NOT NULL,
        status text NOT NULL,
        parked_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        claimed_until timestamptz,
        UNIQUE (group_id, topic, partition, log_offset, handler)
    );
    CREATE INDEX dead_letters_by_status ON dead_letters (group_id, status, id);

    CREATE TABLE subject_keys (
        subject_id uuid PRIMARY KEY,
        key bytea,
        created_at timestamptz NOT NULL DEFAULT now(),
        erased_at timestamptz
    );
    """,
    # 2: `DeadLetter.extra`, a JSON object. Letters parked before have none. A constant default
    # adds the column without rewriting the table.
    """
    ALTER TABLE dead_letters ADD COLUMN extra jsonb NOT NULL DEFAULT '{}'::jsonb;
    """,
]


def lock_name(schema: str) -> str:
    """Return the name hashed into the advisory lock that serialises migrations of `schema`."""
    return f"forge.migrate:{schema}"


async def migrate(connection: Any, schema: str) -> int:
    """Create `schema` if needed and apply the migrations it has not seen yet.

    Everything runs in one transaction that first takes a transaction-level advisory lock. When
    several processes open the same schema at once, one applies the migrations, and the others
    wait for the lock, then find the versions already recorded. PostgreSQL's DDL is
    transactional, so a failed migration leaves the schema as it was. Returns the schema version
    after migrating.
    """
    async with connection.transaction():
        await connection.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", lock_name(schema)
        )

        # CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege on the database when
        # the schema exists (checked on PostgreSQL 18). Creating the schema only when it is
        # missing lets a role without that privilege use a schema made for it by an admin.
        exists = await connection.fetchval(
            "SELECT true FROM pg_namespace WHERE nspname = $1", schema
        )
        if not exists:
            await connection.execute(f'CREATE SCHEMA "{schema}"')
        await connection.execute(f'SET LOCAL search_path TO "{schema}"')
        await connection.execute(
            f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )

        current = await connection.fetchval(f"SELECT max(version) FROM {VERSION_TABLE}") or 0
        if current > len(MIGRATIONS):
            logger.warning(
                "postgres_schema_newer",
                schema=schema,
                version=current,
                known_version=len(MIGRATIONS),
            )
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
            await connection.execute(script)
            await connection.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES ($1)", version)
            logger.info("postgres_schema_migrated", schema=schema, version=version)
        return max(current, len(MIGRATIONS))
