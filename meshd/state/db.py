"""Opening the SQLite database: pragmas, schema and its version.

Every replicated row (sessions, memory, deletions) carries `origin` (the node that made
the change), `version` (that node's change counter, which only grows) and `hlc` (hybrid
logical clock stamp). Replication ships, per origin, the rows with a version above what
the peer has, and merging compares (hlc, origin), so the tables are indexed on
(origin, version). Messages are routed rather than replicated: they are stored once by
`message_id`, with a node-local `seq` for streams, and listed per recipient in `inbox`
with a per-session sequence number.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import stat
from pathlib import Path

from meshd.errors import StoreError
from meshd.state.journal import JOURNAL_NAME, SEGMENTS

log = logging.getLogger("meshd.store")

SCHEMA_VERSION = 6
DB_NAME = "meshd.db"
#: flock'ed by the daemon (exclusively) and by directory-mode stores (shared).
LOCK_FILE = "lock"
CACHE_KIB = 4 * 1024         # page cache per connection (RSS); the OS page cache holds the rest
#: What the WAL file is cut back to once checkpointed (SQLite's journal_size_limit), and
#: above which a checkpoint empties it at once: a WAL grown by a burst of writes would
#: otherwise keep its size for good, space a full disk then lacks to start again.
WAL_KEEP = 4 * 1024 * 1024
#: Every file of a data directory: owner-only, whatever the umask (the database is every
#: session's memory and messages; the service's data dir is owner-only as well).
FILE_MODE = 0o600
PRIVATE_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal", LOCK_FILE,
                 *(f"{JOURNAL_NAME}.{i}" for i in range(SEGMENTS)))

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v) WITHOUT ROWID;

-- Version vector: for each other node, the version through which we hold all its changes.
CREATE TABLE IF NOT EXISTS origins (origin TEXT PRIMARY KEY, known INTEGER NOT NULL) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS sessions (
    session_id   TEXT PRIMARY KEY,
    agent_name   TEXT NOT NULL,
    agent_type   TEXT NOT NULL,
    status       TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    last_ping    REAL NOT NULL,          -- epoch seconds; staleness is computed on read
    human_user   TEXT,
    location     TEXT,
    capabilities BLOB NOT NULL,          -- msgpack list
    current_task TEXT,
    metadata     BLOB NOT NULL,          -- msgpack map
    host         TEXT NOT NULL,          -- node id of the daemon the session registered through
    deleted      INTEGER NOT NULL DEFAULT 0,  -- tombstone (clear_offline), kept for replication
    origin       TEXT NOT NULL,
    version      INTEGER NOT NULL,
    hlc          INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_origin ON sessions(origin, version);
CREATE INDEX IF NOT EXISTS sessions_host ON sessions(host);
CREATE TABLE IF NOT EXISTS session_caps (
    capability TEXT NOT NULL, session_id TEXT NOT NULL, PRIMARY KEY (capability, session_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS session_caps_session ON session_caps(session_id);

CREATE TABLE IF NOT EXISTS memory (
    origin     TEXT NOT NULL,
    version    INTEGER NOT NULL,
    entry_id   TEXT NOT NULL,
    key        TEXT NOT NULL,
    type       TEXT NOT NULL,
    value      BLOB NOT NULL,            -- msgpack
    session_id TEXT NOT NULL,
    timestamp  TEXT NOT NULL,
    ttl        REAL,
    expires_ms INTEGER,                  -- physical(hlc) + ttl: the same instant on every node
    tags       BLOB NOT NULL,
    metadata   BLOB NOT NULL,
    hlc        INTEGER NOT NULL,
    -- Clustered by (origin, version): replication reads ranges of it, and a node's own
    -- writes append at the end of its range, so a set touches few pages.
    PRIMARY KEY (origin, version)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS memory_entry ON memory(entry_id);
CREATE INDEX IF NOT EXISTS memory_key ON memory(key, hlc);
CREATE INDEX IF NOT EXISTS memory_session ON memory(session_id, hlc);
CREATE INDEX IF NOT EXISTS memory_expiry ON memory(expires_ms) WHERE expires_ms IS NOT NULL;
-- Keyed (tag, hlc, entry_id): new entries append at the end of each tag's range.
CREATE TABLE IF NOT EXISTS memory_tags (
    tag TEXT NOT NULL, hlc INTEGER NOT NULL, entry_id TEXT NOT NULL,
    PRIMARY KEY (tag, hlc, entry_id)
) WITHOUT ROWID;

-- A deletion removes every entry of `key` (all keys when NULL) written by `session_id`
-- (any session when NULL) with an hlc at or below its own: entries that arrive later from
-- a peer are checked against it, so a delete is never undone by replication order.
CREATE TABLE IF NOT EXISTS deletions (
    origin     TEXT NOT NULL,
    version    INTEGER NOT NULL,
    hlc        INTEGER NOT NULL,
    key        TEXT,
    session_id TEXT,
    PRIMARY KEY (origin, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deletions_key ON deletions(key, hlc);
CREATE INDEX IF NOT EXISTS deletions_hlc ON deletions(hlc);

CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,   -- node-local arrival order
    message_id   TEXT NOT NULL UNIQUE,
    type         TEXT NOT NULL,
    from_session TEXT NOT NULL,
    to_session   TEXT,
    subject      TEXT NOT NULL,
    body         TEXT NOT NULL,
    data         BLOB NOT NULL,
    timestamp    TEXT NOT NULL,
    in_reply_to  TEXT,
    origin       TEXT NOT NULL,
    hlc          INTEGER NOT NULL,
    priority     TEXT NOT NULL DEFAULT 'normal'
);
CREATE INDEX IF NOT EXISTS messages_from ON messages(from_session, seq);
CREATE INDEX IF NOT EXISTS messages_reply ON messages(in_reply_to) WHERE in_reply_to IS NOT NULL;
CREATE TABLE IF NOT EXISTS inbox (
    session_id TEXT NOT NULL,
    seq        INTEGER NOT NULL,            -- per-session, only grows: the stream cursor
    message_id TEXT NOT NULL,
    read       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox_heads (session_id TEXT PRIMARY KEY, last INTEGER NOT NULL) WITHOUT ROWID;

-- Routing (messages to sessions hosted by other daemons). The sender's daemon queues, per
-- destination node and lane (0 = high priority, 1 = normal), items numbered by `seq`:
-- a message to deliver ('msg') or a read receipt to return ('read'). The destination
-- applies them in seq order, remembers the last it applied per (origin, lane) in
-- `route_in`, and acknowledges; acknowledged items leave the outbox.
CREATE TABLE IF NOT EXISTS outbox (
    dest       TEXT NOT NULL,
    lane       INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    message_id TEXT NOT NULL,
    queued_ms  INTEGER NOT NULL,
    PRIMARY KEY (dest, lane, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox_heads (
    dest TEXT NOT NULL, lane INTEGER NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (dest, lane)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS route_in (
    origin TEXT NOT NULL, lane INTEGER NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (origin, lane)
) WITHOUT ROWID;
-- What the sender's side knows of each message it routed: per destination node,
-- queued -> stored -> read, or expired.
CREATE TABLE IF NOT EXISTS receipts (
    message_id TEXT NOT NULL, node TEXT NOT NULL, state TEXT NOT NULL, at_ms INTEGER NOT NULL,
    PRIMARY KEY (message_id, node)
) WITHOUT ROWID;
-- Direct messages sent from here to a session id no daemon knows yet (the seed's store
-- accepted them). They sit in that id's inbox here, read as "waiting", and go to the
-- daemon where the id registers (or stay, if it registers here), once; or expire.
CREATE TABLE IF NOT EXISTS waiting (
    message_id TEXT PRIMARY KEY, to_session TEXT NOT NULL, queued_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS waiting_to ON waiting(to_session);

-- Memory change events as this node sees them (`meshd.state.memlog`), node-local (not
-- replicated): `seq` is the watch cursor. Bounded: the oldest rows are trimmed and
-- meta 'memlog_trimmed' remembers through which seq (a watcher below it gets a gap).
CREATE TABLE IF NOT EXISTS memlog (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind     TEXT NOT NULL,              -- put, delete, expire
    op       TEXT NOT NULL,              -- set, touch, delete, expire
    key      TEXT NOT NULL,
    origin   TEXT NOT NULL,
    hlc      INTEGER NOT NULL,
    entry_id TEXT,                       -- put, expire: the entry
    tags     BLOB NOT NULL               -- msgpack list: the entry's (a delete's: the union)
);
-- Replicated changes wait here until this node holds everything of their origin before
-- them, so each origin's events are logged in its version (and HLC) order.
CREATE TABLE IF NOT EXISTS memlog_parked (
    origin   TEXT NOT NULL,
    version  INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    op       TEXT NOT NULL,
    key      TEXT NOT NULL,
    hlc      INTEGER NOT NULL,
    entry_id TEXT,
    tags     BLOB NOT NULL,
    PRIMARY KEY (origin, version, key)
) WITHOUT ROWID;
-- The last versions of each key as this node saw them (bounded per key).
CREATE TABLE IF NOT EXISTS memory_history (
    key      TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    op       TEXT NOT NULL,
    origin   TEXT NOT NULL,
    hlc      INTEGER NOT NULL,
    entry_id TEXT,
    PRIMARY KEY (key, seq)
) WITHOUT ROWID;
"""

#: Changes to tables that exist already, by the schema version that introduced them.
MIGRATIONS = {
    3: ["ALTER TABLE messages ADD COLUMN priority TEXT NOT NULL DEFAULT 'normal'"],
    4: [],          # deletions_hlc (in SCHEMA): "is any deletion this recent?" for merges
    5: [],          # waiting (in SCHEMA): messages to session ids nobody has registered yet
    6: [],          # memlog, memlog_parked, memory_history (in SCHEMA): memory change events
}


def connect(data_dir: str | Path, durability: str = "process",
            exclusive: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) the database in `data_dir`, in WAL mode.

    "process" durability uses synchronous=NORMAL: a committed transaction is in the WAL
    file (in the OS) before we answer, so kill -9 loses nothing; "fsync" uses FULL so a
    power cut loses nothing either.

    `exclusive` is for the daemon, the only user of its data directory: the WAL index
    lives in process memory instead of shared memory (no cross-process locking on every
    transaction, and no other connection, of any program, can write the database while
    the daemon has it: its journaled writes stay the only ones stamped with its origin),
    and automatic checkpoints are off so that copying the WAL back into the database never
    lands inside a client's commit; the daemon calls `checkpoint()` from a timer instead.
    (Its flock on LOCK_FILE keeps other daemons and directory-mode stores out before
    SQLite would, with a clearer error: see `lock_shared`.) The daemon also refuses a
    damaged database (`_quick_check`), makes the directory's files owner-only, and starts
    by folding a WAL left by a crash back into the database, which shrinks it.
    """
    path = Path(data_dir)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if exclusive:
            tighten_modes(path)
        # SQLite would create it 0644 (less the umask), and the WAL after it.
        os.close(os.open(path / DB_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE))
        conn = sqlite3.connect(str(path / DB_NAME), isolation_level=None,
                               check_same_thread=False, timeout=30.0)
        if exclusive:
            # Before WAL mode is first used: the WAL index then lives in process memory
            # and no -shm file is ever made, which a full disk could refuse at start.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA journal_size_limit={WAL_KEEP}")
        conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'fsync' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute(f"PRAGMA cache_size={-CACHE_KIB}")
        if exclusive:
            conn.execute("PRAGMA wal_autocheckpoint=0")
            _quick_check(conn, path / DB_NAME)
            try:
                checkpoint(conn, path, truncate=True)
            except sqlite3.Error as exc:           # (a full disk) it is tried again later
                log.warning("could not fold the WAL back into %s at start: %s", DB_NAME, exc)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{path / DB_NAME} has schema {version}, newer than this meshd "
                             f"({SCHEMA_VERSION}); upgrade meshd")
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            if version > 0:                         # an existing database: alter it first
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for stmt in MIGRATIONS.get(v, []):
                        conn.execute(stmt)
            _run_script(conn, SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        return conn
    except sqlite3.Error as exc:
        if sqlite_code(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB):
            raise StoreError(_damaged(path / DB_NAME, str(exc))) from exc
        raise StoreError(f"cannot open the database in {path}: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"cannot open the database in {path}: {exc}") from exc


SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB = 10, 11, 13, 26


def sqlite_code(exc: BaseException | None) -> int | None:
    """SQLite's primary result code of an error (None when it is not SQLite's)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def out_of_space(exc: BaseException) -> bool:
    """Whether an error (or the SQLite error behind a StoreError) says the database could
    not be written for want of space: SQLITE_FULL, or an I/O error, which is how some
    writes on a full disk fail."""
    cause = exc if isinstance(exc, sqlite3.Error) else exc.__cause__
    return sqlite_code(cause) in (SQLITE_FULL, SQLITE_IOERR)


def _quick_check(conn: sqlite3.Connection, file: Path) -> None:
    """Refuse a damaged database at start, with what to do about it, rather than serve
    from it and fail later inside some search. (quick_check reads every page and checks
    the b-trees' structure; it does not check the text inside each value.)"""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise StoreError(_damaged(file, "; ".join(str(p) for p in problems)))


def _damaged(file: Path, detail: str) -> str:
    return (f"the database {file} is damaged ({detail}); meshd will not serve from it. "
            f"Stop everything using it and keep a copy of the directory, then restore "
            f"{file.name} from a backup, or recover what is readable with `sqlite3 {file} "
            f".recover | sqlite3 {file}.recovered` and move that file in its place (and "
            f"{file.name}-wal away), or move {file.name} and {file.name}-wal aside to start "
            f"empty (the peers of a mesh send the replicated state back)")


def tighten_modes(path: Path) -> None:
    """Make the files of a data directory owner-only, saying so: older versions left
    them as the umask gave (0644: readable by every local user)."""
    for name in PRIVATE_FILES:
        f = path / name
        try:
            st = f.lstat()
        except OSError:
            continue                    # not there (SQLite or the daemon makes it 0600)
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077:
            continue
        mode = stat.S_IMODE(st.st_mode)
        try:
            os.chmod(f, FILE_MODE)
        except OSError as exc:
            log.warning("%s is readable by other users (mode %04o) and could not be made "
                        "owner-only: %s", f, mode, exc)
            continue
        log.warning("%s was readable by other users (mode %04o): made it owner-only (%04o)",
                    f, mode, FILE_MODE)


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """executescript() would COMMIT our transaction first; run statements one by one."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            conn.execute(buf)
            buf = ""



def lock_shared(data_dir: str | Path) -> int:
    """For a directory-mode store: a shared flock on LOCK_FILE, held while it is open, so
    it never writes under a running daemon (whose journaled, acknowledged writes it could
    shadow) and a daemon never starts under it. Returns the fd to keep."""
    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"a meshd daemon owns {path}: use it through its socket "
                         "(MESHD_SOCKET), not as a directory") from None
    return fd


def checkpoint(conn: sqlite3.Connection, data_dir: str | Path, truncate: bool = False) -> None:
    """Copy the WAL back into the database; empty the WAL file when it has grown past
    WAL_KEEP (or `truncate`), so it never keeps the size of a past burst."""
    wal = Path(data_dir) / (DB_NAME + "-wal")
    if not truncate:
        try:
            truncate = wal.stat().st_size > WAL_KEEP
        except OSError:
            truncate = False
    conn.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'PASSIVE'})")
