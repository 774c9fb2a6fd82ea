"""The PostgreSQL queue schema (`queue.backend = "postgres"`): ordered, versioned migrations.

`schema_version` holds one row per migration applied. `migrate(conn)` brings a database up to the latest
version inside one transaction that first takes an advisory lock, so two nodes starting (or two operators
running `smtpsvc db migrate`) at the same moment apply each migration once: the second waits for the
first's commit, then finds nothing left to do. A migration is never edited once released; a change of
schema is a new entry at the end of MIGRATIONS.

`init(dsn)` and `migrate_dsn(dsn)` are what `smtpsvc db init|migrate` call: they return a sentence for the
operator, or raise DatabaseError whose message says what to do (bad DSN, wrong password, server down,
missing database, schema newer than this program).

The tables (docs/cluster.md explains the claim query and the leases):
  messages    one row per queued message: the envelope fields that queries need as columns, the rest of
              the envelope as JSON (`envelope`), the message bytes (`body`, bytea: at most 1 GB, so keep
              server.max_message_size far below it), the XEXCH50 blob, `next_due` (earliest next attempt of
              an outstanding recipient, kept by put/save), `frozen`, and the lease (`leased_by`,
              `lease_token`, `lease_until`).
  recipients  one row per recipient, in envelope order (`idx`): delivery state as columns, the rest
              (NOTIFY, ORCPT, history) as JSON (`data`).
  links       (version 2) the next hops an operator froze for the whole cluster.
  link_slots  (version 2) the connection slots of each link, leased by the deliveries of every node, so
              delivery.max_connections_per_domain holds for the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smtpsvc.queue.base import QueueError

# pg_advisory_xact_lock key: any constant works as long as every smtpsvc uses the same one.
MIGRATION_LOCK = 0x736D747073766331  # "smtpsvc1"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "messages, recipients, leases",
        """
        CREATE TABLE messages (
            id            text PRIMARY KEY,
            sender        text NOT NULL,
            received_at   double precision NOT NULL,     -- epoch seconds, as in the envelope
            size          bigint NOT NULL,
            envelope      jsonb NOT NULL,                -- the envelope fields that have no column
            body          bytea NOT NULL,
            xexch50       bytea,
            next_due      double precision,              -- epoch seconds; NULL: nothing outstanding
            frozen        boolean NOT NULL DEFAULT false,
            corrupt       text,                          -- why the row was set aside (frozen) unreadable
            rerun         boolean NOT NULL DEFAULT false, -- retry asked while leased: due at save
            leased_by     text,                          -- node_id of the lease holder (for people)
            lease_token   uuid,                          -- the claim that holds the lease (for save)
            lease_until   timestamptz                    -- database clock: no skew between nodes
        );
        -- The claim query walks this index in due order and skips rows that are leased.
        CREATE INDEX messages_due ON messages (next_due) WHERE NOT frozen;
        CREATE TABLE recipients (
            message_id    text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            idx           integer NOT NULL,              -- position in the envelope
            address       text NOT NULL,
            domain        text NOT NULL,                 -- lower case: ETRN, queue list --domain
            state         text NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
            notified      boolean NOT NULL DEFAULT false,
            next_attempt  double precision NOT NULL,
            attempts      integer NOT NULL DEFAULT 0,
            route         text NOT NULL DEFAULT '',      -- link name of the last routing decision
            last_reply    text NOT NULL DEFAULT '',
            status        text NOT NULL DEFAULT '',
            remote_mta    text NOT NULL DEFAULT '',
            data          jsonb NOT NULL,                -- notify, orcpt, history
            PRIMARY KEY (message_id, idx)
        );
        CREATE INDEX recipients_pending_domain ON recipients (domain) WHERE state = 'pending';
        """,
    ),
    Migration(
        2,
        "frozen links, connection slots per link",
        """
        CREATE TABLE links (
            link          text PRIMARY KEY,              -- a next hop frozen by an operator (route name)
            frozen_by     text NOT NULL DEFAULT '',      -- node_id of the node (or CLI) that froze it
            frozen_at     timestamptz NOT NULL DEFAULT now()
        );
        -- A link freeze or thaw recomputes the due time of the messages waiting for that link.
        CREATE INDEX recipients_pending_route ON recipients (route) WHERE state = 'pending';
        -- Connection slots per link for the whole cluster (delivery.max_connections_per_domain): slot
        -- rows 0..limit-1 of a link, each leased by one delivery at a time, like a message.
        CREATE TABLE link_slots (
            link          text NOT NULL,
            slot          integer NOT NULL,
            leased_by     text,                          -- node_id of the holder (for people)
            token         uuid,                          -- the delivery that holds it
            lease_until   timestamptz,                   -- database clock
            PRIMARY KEY (link, slot)
        );
        """,
    ),
)

LATEST = MIGRATIONS[-1].version


class DatabaseError(QueueError):
    """`smtpsvc db init|migrate` failed; the message says why and what to do (exit code 1)."""


async def migrate(conn: Any) -> tuple[int, int]:
    """Apply the migrations `conn`'s database lacks, in one transaction. Returns (from, to) versions.
    Idempotent; safe to run from several nodes at once (they queue on an advisory lock)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY, description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await current_version(conn)
        if current > LATEST:
            raise DatabaseError(too_new(current))
        for step in MIGRATIONS:
            if step.version > current:
                await conn.execute(step.sql)
                await conn.execute(
                    "INSERT INTO schema_version (version, description) VALUES ($1, $2)",
                    step.version,
                    step.description,
                )
    return current, LATEST


async def current_version(conn: Any) -> int:
    """The schema version of `conn`'s database; 0 when smtpsvc never initialised it."""
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))


async def init(dsn: str, timeout: float = 10.0) -> str:
    """`smtpsvc db init`: create the schema in an empty database. An initialised database is left as it is
    (upgrading is `smtpsvc db migrate`)."""
    conn = await connect(dsn, timeout)
    try:
        current = await current_version(conn)
        if current == 0:
            before, to = await migrate(conn)  # before > 0: another node created it meanwhile
            if before == 0:
                return f"created the smtpsvc queue schema, version {to}"
            current = to
        if current > LATEST:
            raise DatabaseError(too_new(current))
        if current < LATEST:
            return (
                f"the database already holds the smtpsvc queue schema, version {current}; "
                f"run `smtpsvc db migrate` to upgrade it to version {LATEST}"
            )
        return f"the database already holds the smtpsvc queue schema, version {current}: nothing to do"
    except QueueError:
        raise
    except Exception as exc:
        raise explain(exc, dsn) from exc
    finally:
        await conn.close()


async def migrate_dsn(dsn: str, timeout: float = 10.0) -> str:
    """`smtpsvc db migrate`: upgrade (or create) the schema to the latest version."""
    conn = await connect(dsn, timeout)
    try:
        before, after = await migrate(conn)
    except QueueError:
        raise
    except Exception as exc:
        raise explain(exc, dsn) from exc
    finally:
        await conn.close()
    if before == after:
        return f"the smtpsvc queue schema is at version {after}, the latest: nothing to do"
    if before == 0:
        return f"created the smtpsvc queue schema, version {after}"
    return f"upgraded the smtpsvc queue schema from version {before} to {after}"


async def connect(dsn: str, timeout: float) -> Any:
    """One connection for a setup command, or a DatabaseError that names the problem."""
    if not dsn:
        raise DatabaseError(
            'queue.dsn is empty: set it to "postgresql://USER:PASSWORD@HOST:5432/DATABASE" '
            "(or SMTPSVC__QUEUE__DSN)"
        )
    try:
        import asyncpg
    except ImportError:
        raise DatabaseError(_NO_DRIVER) from None
    try:
        return await asyncpg.connect(dsn, timeout=timeout)
    except Exception as exc:
        raise explain(exc, dsn) from exc


_NO_DRIVER = "the PostgreSQL driver is not installed: pip install 'smtpsvc[postgres]' (asyncpg)"


def explain(exc: BaseException, dsn: str) -> DatabaseError:
    """Turn a driver or network exception into a sentence that says what to check."""
    import asyncpg

    where = describe(dsn)
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):  # wrong password, unknown user
        return DatabaseError(
            f"PostgreSQL at {where} refused the login ({detail}): check the user and password in "
            "queue.dsn, and the server's pg_hba.conf"
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return DatabaseError(f"{detail} at {where}: create it first (createdb), or fix queue.dsn")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return DatabaseError(
            f"PostgreSQL at {where}: {detail}: the queue.dsn user needs the right to create tables "
            "(GRANT CREATE ON SCHEMA public TO ...), or let the database owner run `smtpsvc db init`"
        )
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return DatabaseError(f"PostgreSQL at {where} is starting up or shutting down ({detail}): try again")
    if isinstance(exc, (OSError, TimeoutError, asyncpg.PostgresConnectionError)):
        return DatabaseError(
            f"cannot reach PostgreSQL at {where} ({detail}): is the server running, and are the host "
            "and port in queue.dsn right?"
        )
    if isinstance(exc, ValueError):  # asyncpg's DSN parser: ClientConfigurationError, ValueError
        return DatabaseError(
            f"queue.dsn is not a valid PostgreSQL connection string ({detail}): expected "
            '"postgresql://USER:PASSWORD@HOST:5432/DATABASE"'
        )
    return DatabaseError(f"PostgreSQL at {where}: {type(exc).__name__}: {detail}")


def describe(dsn: str) -> str:
    """host:port/database of a DSN, without the password (for messages and logs)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "(unparsable queue.dsn)"
    return f"{host}:{port}{parts.path or '/'}"


def too_new(current: int) -> str:
    return (
        f"the database's smtpsvc queue schema is version {current}, newer than this smtpsvc knows "
        f"(version {LATEST}): upgrade smtpsvc on this node"
    )
