"""Schema of the embedded SQLite file, upgraded in place through `PRAGMA user_version`."""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[str] = [
    # 1: event log, consumer groups, dead letters, audit trail, capsules
    """
    CREATE TABLE event_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        log_offset INTEGER NOT NULL,
        key TEXT,
        value BLOB NOT NULL,
        headers TEXT NOT NULL,
        appended_at TEXT NOT NULL,
        UNIQUE (topic, log_offset)
    );
    CREATE INDEX event_log_by_key ON event_log (key, seq);
    CREATE TABLE topics (
        name TEXT PRIMARY KEY,
        next_offset INTEGER NOT NULL
    );
    CREATE TABLE consumer_positions (
        group_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        next_offset INTEGER NOT NULL,
        committed_at TEXT NOT NULL,
        PRIMARY KEY (group_id, topic)
    );
    CREATE TABLE consumer_members (
        group_id TEXT PRIMARY KEY,
        member_id TEXT NOT NULL,
        pid INTEGER NOT NULL,
        hostname TEXT NOT NULL,
        heartbeat_at REAL NOT NULL
    );
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        group_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        log_offset INTEGER NOT NULL,
        key TEXT,
        value BLOB NOT NULL,
        headers TEXT NOT NULL,
        event_id TEXT,
        event_type TEXT,
        reason TEXT NOT NULL,
        error_type TEXT NOT NULL,
        handler TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        status TEXT NOT NULL,
        parked_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        UNIQUE (group_id, topic, partition, log_offset, handler)
    );
    CREATE INDEX dead_letters_by_status ON dead_letters (group_id, status);
    CREATE TABLE audit_trail (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        event_type TEXT NOT NULL,
        occurred_at TEXT NOT NULL,
        occurred_at_us INTEGER NOT NULL,
        actor_id TEXT,
        actor_type TEXT NOT NULL,
        resource_type TEXT,
        resource_id TEXT,
        correlation_id TEXT,
        causation_id TEXT,
        event_json TEXT NOT NULL,
        recorded_at TEXT NOT NULL
    );
    CREATE INDEX audit_by_time ON audit_trail (occurred_at_us, seq);
    CREATE INDEX audit_by_resource ON audit_trail (resource_id, occurred_at_us);
    CREATE INDEX audit_by_actor ON audit_trail (actor_id, occurred_at_us);
    CREATE INDEX audit_by_type ON audit_trail (event_type, occurred_at_us);
    CREATE INDEX audit_by_correlation ON audit_trail (correlation_id, occurred_at_us);
    CREATE TRIGGER audit_trail_no_update BEFORE UPDATE ON audit_trail
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    CREATE TRIGGER audit_trail_no_delete BEFORE DELETE ON audit_trail
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    CREATE TABLE capsules (
        id TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL,
        capsule_type TEXT NOT NULL,
        title TEXT NOT NULL,
        content TEXT NOT NULL,
        parent_id TEXT,
        version TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        deleted_at TEXT
    );
    CREATE INDEX capsules_by_parent ON capsules (parent_id);
    """,
    # 2: keys that seal personal data, one per subject; an erased key is NULL for good
    """
    CREATE TABLE subject_keys (
        subject_id TEXT PRIMARY KEY,
        key BLOB,
        created_at TEXT NOT NULL,
        erased_at TEXT
    );
    """,
    # 3: `DeadLetter.extra`, a JSON object. Letters parked before have none.
    """
    ALTER TABLE dead_letters ADD COLUMN extra TEXT NOT NULL DEFAULT '{}';
    """,
]


def migrate(connection: sqlite3.Connection) -> None:
    """Apply the migrations this file has not seen yet, each in its own transaction."""
    current = connection.execute("PRAGMA user_version").fetchone()[0]
    for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
        connection.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated between our read and our lock.
            if connection.execute("PRAGMA user_version").fetchone()[0] >= version:
                connection.execute("COMMIT")
                continue
            for statement in _split(script):
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {version}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise


def _split(script: str) -> list[str]:
    """Split a script into statements, keeping trigger bodies whole."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
