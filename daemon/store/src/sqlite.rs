//! The embedded store: one SQLite database in WAL mode, owned by a dedicated thread.
//!
//! SQLite calls block, so they never run on the async reactor. Jobs queue on a channel;
//! the thread takes every job waiting (up to [`MAX_BATCH`]) and runs them in one
//! transaction (again with a savepoint per job if one fails, so that it does not undo the
//! others: [`run_batch`]), then commits with `synchronous=FULL` and only then answers every
//! job: group commit, durable before acknowledged.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, Statement, params};
use tokio::sync::oneshot;

use connectord_model::{
    CertificateRecord, ChannelRecord, Event, HourCount, Job as RequestJob, PresubRecord, PskRecord,
    Registration, StoredEvent, SubscriptionRecord,
};

use crate::health::HealthState;
use crate::{
    Appended, CommitObserver, CredentialStore, EXTERNAL_CHECK, EventLog, Feed, Health, Pending,
    PluginStateStore, QuotaStore, RegistrationChunks, RegistrationStore, RequestStore, StoreError,
    SubscriptionStore,
    journal::{self, Journal},
    record_json,
};

/// Most jobs committed in one transaction.
pub const MAX_BATCH: usize = 1024;

/// How long the store thread waits, while it is busy, after the first job of a batch before
/// it takes the rest and commits ([`SqliteStore::open_with`]; the daemon's
/// `[state] commit_delay_us`). Busy means the last batch held [`GATHER_AFTER`] jobs or more:
/// writers are many, and what arrives in the wait shares the commit (its `fsync`, its WAL
/// pages and the thread's wake-up) instead of paying for its own. A lone writer, whose
/// batches hold one job, is never delayed. Measured under proxied reads (issue 24,
/// docs/PERFORMANCE.md): 8.3 commits per 100 reads at saturation became about 3.7, and at
/// 5 000 reads/s 59 became 29, with the daemon's CPU per paced read down about 15 % and
/// p99 not worse.
pub const DEFAULT_COMMIT_DELAY: Duration = Duration::from_micros(250);

/// Jobs in the last batch from which the store counts as busy ([`DEFAULT_COMMIT_DELAY`]).
pub const GATHER_AFTER: usize = 4;

/// The file name of the database inside the state directory.
pub const DB_FILE: &str = "connectord.db";

/// Versioned schema migrations; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: registrations and access keys (the access_keys table is unused since auth
    // backends became plugins, which keep their keys in plugin_state; it is left in place
    // rather than dropped, so that keys of a database from before then are not destroyed).
    "CREATE TABLE registrations (
        id TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        UNIQUE (domain, name)
    );
    CREATE TABLE access_keys (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        domain TEXT NOT NULL,
        data TEXT NOT NULL
    );",
    // 2: notification channels, their undelivered events, requests to devices.
    "CREATE TABLE channels (
        key_id TEXT PRIMARY KEY,
        data TEXT NOT NULL
    );
    CREATE TABLE events (
        key_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (key_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        data TEXT NOT NULL
    );",
    // 3: subscriptions and pre-subscriptions, per access key.
    "CREATE TABLE subscriptions (
        key_id TEXT NOT NULL,
        ep TEXT NOT NULL,
        path TEXT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (key_id, ep, path)
    ) WITHOUT ROWID;
    CREATE TABLE presubscriptions (
        key_id TEXT PRIMARY KEY,
        data TEXT NOT NULL
    );",
    // 4: plugins' durable key-value state.
    "CREATE TABLE plugin_state (
        plugin TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (plugin, key)
    ) WITHOUT ROWID;",
    // 5: requests keyed by an increasing row number instead of their random async-response
    // id. The id's unique index put every insert and delete on a random page of the
    // index, so a group commit wrote about 20 WAL pages for 40 jobs under proxied reads;
    // new rows now go to the right-hand end and answered ones leave from the left.
    "CREATE TABLE requests_by_row (
        row INTEGER PRIMARY KEY,
        data TEXT NOT NULL
    );
    INSERT INTO requests_by_row (data) SELECT data FROM requests ORDER BY rowid;
    DROP TABLE requests;
    ALTER TABLE requests_by_row RENAME TO requests;",
    // 6: the traffic limits' hourly transaction counts per domain, so that a restart goes
    // on with the last 24 hours instead of a new day.
    "CREATE TABLE limit_counts (
        domain TEXT NOT NULL,
        hour INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (domain, hour)
    ) WITHOUT ROWID;",
    // 7: a registration names where its device is as a peer reference (the listener and
    // the session on it, issue 20) instead of two socket addresses: `"peer": "<device>",
    // "local": "<our socket>"` becomes `"peer": {"listener": "udp:<our socket>", "session":
    // "<device>"}`. Rows that are not of the old shape are left alone (a row that is not
    // JSON is skipped at load as before).
    "UPDATE registrations
     SET data = json_set(json_remove(data, '$.local'), '$.peer', json_object(
         'listener', 'udp:' || json_extract(data, '$.local'),
         'session', json_extract(data, '$.peer')))
     WHERE json_valid(data)
       AND json_type(data, '$.peer') = 'text'
       AND json_type(data, '$.local') = 'text';",
    // 8: events are stored as the store's own record of their typed entry (issue 20,
    // `record_json::event`), no longer as the rendered mbed JSON entry with the key id and
    // sequence number repeated: `{"key_id", "seq", "event": {"kind", "body": <entry>,
    // "created_ms"}}` becomes `{"kind", "created_ms", <the entry's fields>}` (`max-age`
    // is `max_age`; a de-registration's or expiry's entry, the endpoint name, is `ep`; a
    // registration's resources are kept, their `rf` ignored).
    // Rows that are not of the old shape are left alone (skipped at load, as before).
    // The store numbers events now: `event_epoch` counts the opens (see `EPOCH_SHIFT`).
    "CREATE TABLE event_epoch (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        epoch INTEGER NOT NULL
    );
    UPDATE events SET data = (
        SELECT CASE k
            WHEN 'notifications' THEN json_object('kind', k, 'created_ms', t,
                'ep', b->>'$.ep', 'path', b->>'$.path', 'ct', b->>'$.ct',
                'max_age', b->>'$.\"max-age\"', 'payload', b->>'$.payload')
            WHEN 'registrations' THEN json_object('kind', k, 'created_ms', t,
                'ep', b->>'$.ep', 'ept', b->>'$.ept', 'q', b->'$.q', 'lwm2m', b->>'$.lwm2m',
                'ct', b->>'$.ct', 'resources', b->'$.resources')
            WHEN 'reg-updates' THEN json_object('kind', k, 'created_ms', t,
                'ep', b->>'$.ep', 'ept', b->>'$.ept', 'q', b->'$.q', 'lwm2m', b->>'$.lwm2m',
                'ct', b->>'$.ct', 'resources', b->'$.resources')
            WHEN 'de-registrations' THEN json_object('kind', k, 'created_ms', t, 'ep', b->>'$')
            WHEN 'registrations-expired' THEN json_object('kind', k, 'created_ms', t,
                'ep', b->>'$')
            WHEN 'async-responses' THEN json_object('kind', k, 'created_ms', t,
                'id', b->>'$.id', 'status', b->>'$.status', 'payload', b->>'$.payload',
                'ct', b->>'$.ct', 'max_age', b->>'$.\"max-age\"', 'error', b->>'$.error',
                'location', b->>'$.location')
            WHEN 'subscription-errors' THEN json_object('kind', k, 'created_ms', t,
                'ep', b->>'$.ep', 'path', b->>'$.path', 'status', b->>'$.status',
                'error', b->>'$.error')
            ELSE events.data
        END
        FROM (SELECT events.data->>'$.event.kind' AS k,
                     events.data->>'$.event.created_ms' AS t,
                     events.data->'$.event.body' AS b))
    WHERE json_valid(data) AND json_type(data, '$.event') = 'object';",
    // 9: device credentials (issue 21): each endpoint's PSK (the key in clear: a PSK
    // handshake needs it, so it cannot be hashed; the database is 0600), and the device
    // certificates the CA issued, revoked by serial. `IF NOT EXISTS`: a database whose
    // `user_version` was set back (as tests do to replay an older migration) keeps them.
    "CREATE TABLE IF NOT EXISTS device_psks (
        domain TEXT NOT NULL,
        ep TEXT NOT NULL,
        identity TEXT NOT NULL UNIQUE,
        key BLOB NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (domain, ep)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS device_certificates (
        serial TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        ep TEXT NOT NULL,
        issued_ms INTEGER NOT NULL,
        not_after_ms INTEGER NOT NULL,
        revoked_ms INTEGER
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS device_certificates_by_ep ON device_certificates (domain, ep);",
    // 10: requests to devices and undelivered events are kept in the journal (issue 24,
    // `journal`): a batch's records in one row, not one row each. The rows of the two
    // tables move into it as they are, one record a row, and the tables are dropped: a
    // daemon of the release before still running on the file (the package replaced the
    // binary, and another process of the new one opened the database before the restart)
    // then fails its writes loudly instead of writing where nothing reads.
    "CREATE TABLE IF NOT EXISTS journal (
        id INTEGER PRIMARY KEY,
        kind INTEGER NOT NULL,
        data BLOB NOT NULL
    );
    INSERT INTO journal (kind, data)
        SELECT 0, CAST('R' || row || ':' || length(CAST(data AS BLOB)) || ':' || data AS BLOB)
        FROM requests ORDER BY row;
    DROP TABLE requests;
    INSERT INTO journal (kind, data)
        SELECT 1, CAST('E' || seq || ':' || length(CAST(key_id AS BLOB)) || ':' || key_id
            || length(CAST(data AS BLOB)) || ':' || data AS BLOB)
        FROM events ORDER BY key_id, seq;
    DROP TABLE events;",
];

/// One queued operation.
///
/// An operation may run twice: if any job of a batch fails, the whole transaction is rolled
/// back and the batch runs again with a savepoint around each job (see [`run_batch`]). So an
/// operation touches nothing but the connection, and its result is the one of its last run.
trait Job: Send {
    /// Runs the operation inside the batch transaction and keeps its result; says whether
    /// it succeeded.
    fn run(&mut self, db: &Db<'_>) -> bool;
    /// Makes the job's result this error (it could not run in its savepoint).
    fn reject(&mut self, e: StoreError);
    /// Answers the caller once the commit outcome is known.
    fn complete(self: Box<Self>, commit: Result<(), &StoreError>);
    /// Answers the caller without a result (the transaction could not start).
    fn fail(self: Box<Self>, e: &StoreError);
    /// The job's error, if it failed because the storage did (see
    /// [`StoreError::is_unavailable`]).
    fn storage_failure(&self) -> Option<&StoreError>;
}

struct FnJob<T, F> {
    f: F,
    result: Option<Result<T, StoreError>>,
    tx: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for FnJob<T, F>
where
    T: Send + 'static,
    F: FnMut(&Db<'_>) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, db: &Db<'_>) -> bool {
        let r = (self.f)(db);
        let ok = r.is_ok();
        self.result = Some(r);
        ok
    }

    fn reject(&mut self, e: StoreError) {
        self.result = Some(Err(e));
    }

    fn complete(self: Box<Self>, commit: Result<(), &StoreError>) {
        let out = match (self.result, commit) {
            (Some(Ok(v)), Ok(())) => Ok(v),
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(_)), Err(e)) => Err(StoreError::Commit(e.to_string())),
            (None, Err(e)) => Err(StoreError::Commit(e.to_string())),
            (None, Ok(())) => Err(StoreError::Commit("the job did not run".into())),
        };
        let _ = self.tx.send(out);
    }

    fn fail(self: Box<Self>, e: &StoreError) {
        let _ = self.tx.send(Err(StoreError::Commit(e.to_string())));
    }

    fn storage_failure(&self) -> Option<&StoreError> {
        match &self.result {
            Some(Err(e)) if e.is_unavailable() => Some(e),
            _ => None,
        }
    }
}

/// Handle to the store thread. Dropping it stops the thread after it has committed what
/// was queued, and waits for that (so the database is closed when the drop returns: a
/// daemon started again in the same process opens it after).
pub struct SqliteStore {
    tx: mpsc::Sender<Box<dyn Job>>,
    /// The store thread, joined at drop.
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
    /// Moved by the store thread when `PRAGMA data_version` says another connection (so
    /// another process: this one has only the thread's) committed a write.
    external: tokio::sync::watch::Receiver<u64>,
    /// Whether writes succeed now; set by the store thread after each batch.
    health: Arc<HealthState>,
    /// This open's epoch ([`EPOCH_SHIFT`]).
    epoch: u64,
    /// The events numbered for each key since this open ([`EventLog::append_events`]).
    /// Fx hashing, as the journal's index: its keys are key ids, which the auth backends
    /// issue (random, or a record's id) and a request cannot choose, and an entry is only
    /// made for a key with a channel. SipHash was about 200 instructions of every event
    /// appended (callgrind, issue 24).
    numbered: Mutex<rustc_hash::FxHashMap<String, u64>>,
    /// The object list of the last registration put, escaped as a JSON string once
    /// ([`SqliteStore::registration_json`]).
    links_json: Mutex<Option<(Arc<str>, Box<serde_json::value::RawValue>)>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `dir`, migrates it and probes it (see
    /// [`probe`]): a state the daemon could not write, or corrupt pages, fail here, with
    /// the file and the cause, rather than at the first write. If the open fails, the
    /// directory and database it created are removed again, so a failed start leaves the
    /// state directory as it was.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_observed(dir, Arc::new(()))
    }

    /// As [`SqliteStore::open`], observing each batch transaction's time in `commits` (the
    /// daemon's `store_commit_duration_seconds`, made before the store so that the
    /// listeners bound first count into the same counters).
    pub fn open_observed(
        dir: &Path,
        commits: Arc<dyn CommitObserver>,
    ) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(dir, commits, DEFAULT_COMMIT_DELAY)
    }

    /// As [`SqliteStore::open_observed`], waiting `commit_delay` for more jobs before each
    /// commit while the store is busy (see [`DEFAULT_COMMIT_DELAY`]; zero: never).
    pub fn open_with(
        dir: &Path,
        commits: Arc<dyn CommitObserver>,
        commit_delay: Duration,
    ) -> Result<SqliteStore, StoreError> {
        let created_dir = !dir.is_dir();
        create_private_dir(dir)?;
        let path = dir.join(DB_FILE);
        let created_file = match create_private_file(&path) {
            Ok(created) => created,
            Err(e) => {
                if created_dir {
                    let _ = std::fs::remove_dir(dir);
                }
                return Err(e);
            }
        };
        let opened =
            Self::open_created(dir, &path, commits, commit_delay).map_err(|e| unusable(&path, e));
        if opened.is_err() && created_file {
            for f in [DB_FILE, "connectord.db-wal", "connectord.db-shm"] {
                let _ = std::fs::remove_file(dir.join(f));
            }
            if created_dir {
                let _ = std::fs::remove_dir(dir);
            }
        }
        opened
    }

    fn open_created(
        dir: &Path,
        path: &Path,
        commits: Arc<dyn CommitObserver>,
        commit_delay: Duration,
    ) -> Result<SqliteStore, StoreError> {
        writable_dir(dir)?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement the store runs stays prepared (rusqlite keeps 16 by default).
        conn.set_prepared_statement_cache_capacity(64);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let (gate, epoch) = if version < MIGRATIONS.len() as i64 {
            // A new database, or one to migrate: checked before the migration writes.
            probe(&conn, path)?;
            migrate(&conn)?;
            (Gate::Passed, next_event_epoch(&conn)?)
        } else {
            // Up to date (or too new: `migrate` refuses it without writing): the check
            // runs on its own connection while the daemon loads its state ([`Gate`]).
            migrate(&conn)?;
            let epoch = peek_event_epoch(&conn)?;
            let check_path = path.to_path_buf();
            let check = std::thread::Builder::new()
                .name("store-check".into())
                .spawn(move || {
                    let checked = Connection::open(&check_path)
                        .and_then(|c| c.busy_timeout(Duration::from_secs(5)).map(|()| c))
                        .map_err(StoreError::from)
                        .and_then(|c| quick_check(&c, &check_path));
                    checked.map_err(|e| unusable(&check_path, e))
                })
                .map_err(|e| StoreError::Dir {
                    path: dir.to_path_buf(),
                    source: e,
                })?;
            (Gate::Pending { check, epoch }, epoch)
        };
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        // The thread prepares its statements first and says whether it could: a store
        // that cannot run them fails here, not at its first write.
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), StoreError>>(1);
        let (external_tx, external) = tokio::sync::watch::channel(0u64);
        let health = Arc::new(HealthState::default());
        let thread_health = Arc::clone(&health);
        let thread_path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || {
                let start = Start {
                    gate,
                    path: thread_path,
                };
                run(
                    conn,
                    start,
                    Queue { rx, commit_delay },
                    ready_tx,
                    external_tx,
                    &*commits,
                    thread_health,
                )
            })
            .map_err(|e| StoreError::Dir {
                path: dir.to_path_buf(),
                source: e,
            })?;
        ready_rx.recv().unwrap_or(Err(StoreError::Closed))?;
        Ok(SqliteStore {
            tx,
            thread: Some(thread),
            path: path.to_path_buf(),
            external,
            health,
            epoch,
            numbered: Mutex::default(),
            links_json: Mutex::new(None),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the start-up check ([`Gate`]) and commits this open's epoch: `Ok` once
    /// the database passed `PRAGMA quick_check` and took a write; the check's verdict
    /// (naming the file and the cause) if not. The daemon awaits it after loading its
    /// state and before it reports ready. Submit it after the loads: the store thread
    /// waits for the check while it runs this job.
    pub fn startup_check(&self) -> Pending<()> {
        self.submit(|db| db.check_gate())
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has committed what was queued.
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, closed));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SqliteStore {
    fn submit<T: Send + 'static>(
        &self,
        f: impl FnMut(&Db<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Pending<T> {
        let (tx, rx) = oneshot::channel();
        match self.tx.send(Box::new(FnJob {
            f,
            result: None,
            tx,
        })) {
            Ok(()) => Pending::new(rx),
            Err(_) => Pending::failed(StoreError::Closed),
        }
    }
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| StoreError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    Ok(())
}

/// Creates the database file, if absent, readable by its owner only: SQLite would create
/// it 0644 (less the umask), and its WAL files take the database file's mode. Says
/// whether it created it.
fn create_private_file(path: &Path) -> Result<bool, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(StoreError::Dir {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// How long the start-up `PRAGMA quick_check` may run (it reads every page: about a second
/// per few hundred MB on an SSD). Past it the check is interrupted and the daemon starts
/// with a warning: a large healthy database must not keep the daemon from starting.
pub const QUICK_CHECK_LIMIT: Duration = Duration::from_secs(10);

/// SQLite opens a database it cannot write read-only without a word, and then fails
/// every write; so the directory (where the WAL files live) is checked first by creating
/// and removing a file in it.
fn writable_dir(dir: &Path) -> Result<(), StoreError> {
    let probe = dir.join(".connectord-write-probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| StoreError::Commit(format!("cannot write in {}: {e}", dir.display())))
}

/// The start-up probe of a database to migrate: [`quick_check`] and a write transaction
/// (`user_version` written back as it is, so that a commit really reaches the file), both
/// before the migration and before the daemon reports ready. An up-to-date database is
/// checked beside the load instead ([`Gate`]).
fn probe(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    quick_check(conn, path)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let tx = conn.unchecked_transaction()?;
    tx.pragma_update(None, "user_version", version)?;
    tx.commit()?;
    Ok(())
}

/// `PRAGMA quick_check`, bounded by [`QUICK_CHECK_LIMIT`]: `Ok` when the database is
/// sound or the check ran out of time (logged), [`StoreError::Unusable`] naming the file
/// and the cause when it is not.
fn quick_check(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let interrupt = conn.get_interrupt_handle();
    let (done, timer) = mpsc::channel::<()>();
    let timer = std::thread::spawn(move || {
        let expired = matches!(
            timer.recv_timeout(QUICK_CHECK_LIMIT),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        if expired {
            interrupt.interrupt();
        }
        expired
    });
    let checked: Result<Vec<String>, rusqlite::Error> = conn
        .prepare("PRAGMA quick_check(5)")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect());
    drop(done);
    let expired = timer.join().unwrap_or(false);
    match checked {
        Ok(lines) if lines.len() == 1 && lines[0] == "ok" => {}
        Ok(lines) => {
            return Err(StoreError::Unusable {
                path: path.to_path_buf(),
                cause: format!(
                    "the database is corrupt (PRAGMA quick_check: {}); restore a backup",
                    lines.join("; ")
                ),
            });
        }
        Err(e)
            if expired
                && e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) =>
        {
            tracing::warn!(
                "store: {}: PRAGMA quick_check did not finish within {} s; starting without it",
                path.display(),
                QUICK_CHECK_LIMIT.as_secs()
            );
        }
        Err(e) => return Err(unusable(path, e.into())),
    }
    Ok(())
}

impl From<rusqlite::Error> for StoreError {
    /// SQLite's error, with its verdict on whether the storage itself is failing (disk
    /// full, read-only, I/O error, corrupt pages, busy, ...) rather than one statement.
    fn from(e: rusqlite::Error) -> StoreError {
        use rusqlite::ErrorCode as C;
        let unavailable = matches!(
            e.sqlite_error_code(),
            Some(
                C::DiskFull
                    | C::SystemIoFailure
                    | C::ReadOnly
                    | C::DatabaseCorrupt
                    | C::NotADatabase
                    | C::CannotOpen
                    | C::DatabaseBusy
                    | C::DatabaseLocked
                    | C::PermissionDenied
                    | C::OutOfMemory
            )
        );
        StoreError::Backend {
            source: Box::new(e),
            unavailable,
        }
    }
}

/// Names the file and the cause of an error met while opening the store.
fn unusable(path: &Path, e: StoreError) -> StoreError {
    use rusqlite::ErrorCode as C;
    let sqlite = match &e {
        StoreError::Backend { source, .. } => source.downcast_ref::<rusqlite::Error>(),
        _ => None,
    };
    let cause = match (&e, sqlite) {
        (_, Some(s)) => match s.sqlite_error_code() {
            Some(C::ReadOnly) => format!("read-only: the daemon cannot write it ({s})"),
            Some(C::NotADatabase) => format!("not a database ({s})"),
            Some(C::DatabaseCorrupt) => format!("the database is corrupt ({s}); restore a backup"),
            Some(C::DiskFull) => format!("the disk is full ({s})"),
            Some(C::CannotOpen) => format!("cannot be opened ({s})"),
            Some(C::PermissionDenied) => format!("permission denied ({s})"),
            _ => s.to_string(),
        },
        (StoreError::Commit(m), _) => m.clone(),
        _ => return e,
    };
    StoreError::Unusable {
        path: path.to_path_buf(),
        cause,
    }
}

/// An event's sequence number is `epoch << EPOCH_SHIFT | n`: the store's epoch, counted up
/// at every open (`event_epoch`), and the event's number for its key since that open
/// (from 1). So numbers grow per key and are never given twice, not after a delete and
/// not after a restart, without a write per event: the epoch is written once per open.
/// Decision: a high-water mark written with every append (an upsert per event into a
/// per-key table, the first version) cost about 4 700 instructions per notification to a
/// long-poll, 5 % of the daemon's 87 300 (callgrind, docs/PERFORMANCE.md, issue 20). A key gets 2^40 (about 10^12) numbers per open;
/// the epoch, 2^23 opens.
pub const EPOCH_SHIFT: u32 = 40;

/// Counts this open's epoch: one more than the last, and above every stored number's
/// (numbers the hub gave before the store did, migrated by schema 8, are small).
fn next_event_epoch(conn: &Connection) -> Result<u64, StoreError> {
    let epoch = peek_event_epoch(conn)?;
    conn.execute(EPOCH_UPSERT, params![epoch as i64])?;
    Ok(epoch)
}

/// This open's epoch, one more than the last (1 for a database without one), without
/// writing it ([`next_event_epoch`] writes it at once): an
/// up-to-date database is not written before its start-up check has passed ([`Gate`]),
/// which writes it ([`EPOCH_UPSERT`]). Events numbered with it before then are written in
/// the transaction that writes it, or after.
///
/// Called after the migrations: every stored number is below it. A database from before
/// schema 8 has no epoch, and its numbers, which the hub gave from 1, are below `1 <<
/// EPOCH_SHIFT` (schema 10 moved them into the journal and dropped their table).
fn peek_event_epoch(conn: &Connection) -> Result<u64, StoreError> {
    let stored: Option<i64> = conn
        .query_row("SELECT epoch FROM event_epoch WHERE id = 0", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(stored.map_or(1, |e| e.max(0) as u64 + 1))
}

/// Writes the epoch [`peek_event_epoch`] counted.
const EPOCH_UPSERT: &str = "INSERT INTO event_epoch (id, epoch) VALUES (0, ?1)
     ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch";

/// The start-up check of an up-to-date database (issue 24: restart within 2 s). Before,
/// `PRAGMA quick_check` read every page before the load began (about 0.5 s of a 2.4 s
/// restart at 1 000 000 registrations); now it runs on a connection and thread of its own
/// while the store thread serves the loads. Nothing is committed before it has passed:
/// the first batch that changed rows, or in which a job failed (a load reading corrupt
/// pages), waits for its verdict, and if the database is unusable that batch is rolled
/// back and every job of it and after it gets the check's error (naming the file and the
/// cause). The daemon awaits [`SqliteStore::startup_check`] before it reports ready, so
/// a corrupt database still refuses the start, after the load rather than before it.
enum Gate {
    /// The check runs; `epoch` is written once it has passed.
    Pending {
        check: std::thread::JoinHandle<Result<(), StoreError>>,
        epoch: u64,
    },
    /// The check passed; the epoch is written before the next commit.
    Checked { epoch: u64 },
    /// The check passed and the epoch is committed.
    Passed,
    /// The database is unusable; the check's cause.
    Failed(String),
}

/// What the store thread starts with besides its connection.
struct Start {
    gate: Gate,
    path: PathBuf,
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!("store: migrated database schema to version {version}");
    }
    Ok(())
}

/// The store thread's view of the database: the connection (jobs use it through `Deref`,
/// with the statement cache for most statements), and the statements of every proxied read,
/// every notification and every registration, prepared once for the thread's life. Decision: through the
/// cache each use looks the SQL text up and puts the statement back, about 3 000
/// instructions per proxied read (callgrind, docs/PERFORMANCE.md); the thread runs one job
/// at a time, so a `RefCell` each is enough.
struct Db<'c> {
    conn: &'c Connection,
    /// The start-up check ([`Gate`]) and the database file it names.
    gate: RefCell<Gate>,
    path: PathBuf,
    /// A registration's put ([`RegistrationStore::put_registration`]).
    put_registration: RefCell<Statement<'c>>,
    /// Requests to devices and undelivered events ([`journal`]), and its statements.
    journal: RefCell<Journal>,
    journal_sql: journal::Sql<'c>,
}

impl<'c> Db<'c> {
    fn new(conn: &'c Connection, start: Start) -> Result<Db<'c>, StoreError> {
        let prepare = |sql| conn.prepare(sql).map(RefCell::new);
        Ok(Db {
            conn,
            gate: RefCell::new(start.gate),
            path: start.path,
            // REPLACE deletes every row the new one conflicts with, by id (the same
            // registration) or by (domain, name) (another registration of the name), then
            // inserts it: one statement for what was a DELETE of the name's other rows and
            // an upsert by id.
            put_registration: prepare(
                "INSERT OR REPLACE INTO registrations (id, domain, name, data) VALUES (?1, ?2, ?3, ?4)",
            )?,
            journal: RefCell::new(Journal::default()),
            journal_sql: journal::Sql::new(conn)?,
        })
    }
}

impl Db<'_> {
    /// Whether the start-up check has not been waited for yet.
    fn gate_pending(&self) -> bool {
        matches!(*self.gate.borrow(), Gate::Pending { .. })
    }

    /// Waits for the start-up check if it runs; the check's verdict ([`Gate`]).
    fn check_gate(&self) -> Result<(), StoreError> {
        let mut gate = self.gate.borrow_mut();
        if let Gate::Pending { .. } = &*gate {
            let Gate::Pending { check, epoch } = std::mem::replace(&mut *gate, Gate::Passed) else {
                unreachable!("matched above")
            };
            *gate = match check.join() {
                Ok(Ok(())) => Gate::Checked { epoch },
                Ok(Err(StoreError::Unusable { cause, .. })) => Gate::Failed(cause),
                Ok(Err(e)) => Gate::Failed(e.to_string()),
                Err(_) => Gate::Failed("the start-up check panicked".into()),
            };
        }
        match &*gate {
            Gate::Failed(cause) => Err(StoreError::Unusable {
                path: self.path.clone(),
                cause: cause.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Writes the epoch of a check that has passed into the open transaction; says
    /// whether it did (the gate is [`Gate::Passed`] once that commits).
    fn write_checked_epoch(&self) -> Result<bool, StoreError> {
        let Gate::Checked { epoch } = *self.gate.borrow() else {
            return Ok(false);
        };
        self.conn
            .prepare_cached(EPOCH_UPSERT)?
            .execute(params![epoch as i64])
            .map_err(|e| unusable(&self.path, e.into()))?;
        Ok(true)
    }
}

impl Deref for Db<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// The store thread's job queue and how it gathers batches from it.
struct Queue {
    rx: mpsc::Receiver<Box<dyn Job>>,
    /// [`DEFAULT_COMMIT_DELAY`].
    commit_delay: Duration,
}

fn run(
    conn: Connection,
    start: Start,
    Queue { rx, commit_delay }: Queue,
    ready: mpsc::SyncSender<Result<(), StoreError>>,
    external: tokio::sync::watch::Sender<u64>,
    commits: &dyn CommitObserver,
    health: Arc<HealthState>,
) {
    let db = match Db::new(&conn, start) {
        Ok(db) => db,
        Err(e) => {
            // `open` returns this error; nothing was queued yet.
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let data_version = || {
        conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
            .ok()
    };
    let mut seen = data_version();
    let mut checked = Instant::now();
    // Jobs in the last batch: from GATHER_AFTER on, the next waits `commit_delay`.
    let mut last_batch = 0;
    loop {
        match rx.recv_timeout(EXTERNAL_CHECK.saturating_sub(checked.elapsed())) {
            Ok(first) => {
                if last_batch >= GATHER_AFTER && !commit_delay.is_zero() {
                    // A sleep, not a wait on the queue: the writers meanwhile send without
                    // waking this thread.
                    std::thread::sleep(commit_delay);
                }
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
                let started = Instant::now();
                last_batch = batch.len();
                run_batch(&db, batch, &health);
                commits.observe(started.elapsed());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // At most once a second, busy or idle: this connection's own commits leave
        // data_version alone, so a change is another process's write.
        if checked.elapsed() >= EXTERNAL_CHECK {
            checked = Instant::now();
            let now = data_version();
            if now.is_some() && now != seen {
                seen = now;
                // The journal's rows may have changed under its index.
                db.journal.borrow_mut().forget();
                external.send_modify(|n| *n += 1);
            }
        }
    }
    // A check still running holds a connection: wait for it, so that the database is
    // closed (and its WAL checkpointed away) when the store's drop returns.
    if db.gate_pending() {
        let _ = db.check_gate();
    }
    tracing::debug!("store thread stopped");
}

/// Runs a batch in one transaction and answers every job after the commit.
///
/// The jobs run one after the other with no savepoint between them: a savepoint costs two
/// statements per job and makes SQLite copy every page a job first touches into the
/// sub-journal (about 7 % of the daemon's CPU under a stream of notifications). If a job
/// fails (rare: a constraint, a full disk), the transaction is rolled back and the batch
/// runs again, each job inside its own savepoint, so that the failing job is undone alone
/// and the others commit.
fn run_batch(conn: &Db<'_>, mut batch: Vec<Box<dyn Job>>, health: &HealthState) {
    // Only a batch that changed rows shows that writes succeed again: reads commit on a
    // full disk too.
    let changes_before = conn.total_changes();
    if let Err(e) = begin(conn) {
        health.failed(&e);
        batch.into_iter().for_each(|job| job.fail(&e));
        return;
    }
    let mut all_ok = batch.iter_mut().all(|job| job.run(conn));
    if all_ok && let Err(e) = conn.journal.borrow_mut().flush(&conn.journal_sql) {
        // Run again job by job, so that the jobs whose records cannot be written fail
        // alone (below).
        tracing::debug!("store: cannot write the batch's journal records: {e}");
        all_ok = false;
    }
    if conn.gate_pending()
        && (!all_ok || conn.total_changes() > changes_before)
        && let Err(e) = conn.check_gate()
    {
        refuse_batch(conn, batch, e, health);
        return;
    }
    if !all_ok {
        let redo = conn.rollback().and_then(|()| begin(conn));
        if let Err(e) = redo {
            health.failed(&e);
            let _ = conn.rollback();
            batch.into_iter().for_each(|job| job.fail(&e));
            return;
        }
        for job in &mut batch {
            // Cached statements: parsing these for every job showed up in profiles.
            if let Err(e) = exec_cached(conn, "SAVEPOINT job") {
                tracing::debug!("store: cannot open a savepoint: {e}");
                job.reject(e);
                continue;
            }
            // Each job's journal records are written inside its savepoint, so that a
            // job that fails takes only its own with it.
            let ok = job.run(conn)
                && match conn.journal.borrow_mut().flush(&conn.journal_sql) {
                    Ok(()) => true,
                    Err(e) => {
                        job.reject(e);
                        false
                    }
                };
            if !ok {
                // Undo this job's partial writes, keep the rest of the batch.
                let _ = exec_cached(conn, "ROLLBACK TO job");
                conn.journal.borrow_mut().forget();
            }
            let _ = exec_cached(conn, "RELEASE job");
        }
    }
    let epoch = match conn.write_checked_epoch() {
        Ok(written) => written,
        Err(e) => {
            refuse_batch(conn, batch, e, health);
            return;
        }
    };
    let commit = exec_cached(conn, "COMMIT");
    if epoch && commit.is_ok() {
        *conn.gate.borrow_mut() = Gate::Passed;
    }
    match &commit {
        Err(e) => {
            health.failed(e);
            let _ = conn.rollback();
        }
        Ok(()) => match batch.iter().find_map(|job| job.storage_failure()) {
            // A job refused by the storage (a full disk on its insert) while the others
            // committed: the store is failing all the same.
            Some(e) => health.failed(e),
            None if conn.total_changes() > changes_before => health.succeeded(),
            None => {}
        },
    }
    for job in batch {
        job.complete(commit.as_ref().map(|_| ()));
    }
}

/// Rolls the open transaction back and answers every job of the batch with `e` (the
/// start-up check's verdict, or the failed write of the epoch).
fn refuse_batch(conn: &Db<'_>, batch: Vec<Box<dyn Job>>, e: StoreError, health: &HealthState) {
    let _ = conn.rollback();
    health.failed(&e);
    for mut job in batch {
        job.reject(match &e {
            StoreError::Unusable { path, cause } => StoreError::Unusable {
                path: path.clone(),
                cause: cause.clone(),
            },
            other => StoreError::Commit(other.to_string()),
        });
        job.complete(Err(&e));
    }
}

impl Db<'_> {
    /// Rolls the open transaction back, and with it the journal's index ([`journal`]).
    fn rollback(&self) -> Result<(), StoreError> {
        self.journal.borrow_mut().forget();
        Ok(self.execute_batch("ROLLBACK")?)
    }
}

fn begin(conn: &Connection) -> Result<(), StoreError> {
    exec_cached(conn, "BEGIN IMMEDIATE")
}

/// Runs a statement without parameters from the connection's statement cache (`BEGIN`
/// and `COMMIT` of every batch too: `execute_batch` would parse them each time).
fn exec_cached(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Runs an upsert whose parameters are (key, JSON of the record).
fn upsert_json<T: serde::Serialize>(
    conn: &Connection,
    sql: &str,
    key: &str,
    record: &T,
) -> Result<(), StoreError> {
    let data = to_json(record)?;
    conn.prepare_cached(sql)?.execute(params![key, data])?;
    Ok(())
}

/// Reads every `data` column of a query as JSON records; unreadable rows are logged and
/// skipped (one bad row must not stop the daemon from starting).
fn load_json<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    what: &str,
) -> Result<Vec<T>, StoreError> {
    load_json_keyed(conn, sql, what, |_, _| Ok(()))
}

/// As [`load_json`], the record in column 0; `key` completes each record read from the
/// row's other columns (a key kept beside the JSON rather than in it).
fn load_json_keyed<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    what: &str,
    key: impl Fn(&rusqlite::Row<'_>, &mut T) -> rusqlite::Result<()>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let data: String = row.get(0)?;
        match serde_json::from_str::<T>(&data) {
            Ok(mut r) => {
                key(row, &mut r)?;
                out.push(r);
            }
            Err(e) => tracing::error!("store: skipping unreadable {what}: {e}"),
        }
    }
    Ok(out)
}

/// Rows a chunk of [`load_json_pipelined`] hands to its parsing thread.
const LOAD_CHUNK: usize = 4096;

/// As [`load_json`], with the JSON parsed on a second thread while this one reads the
/// next rows: at start, with a million registrations, reading and parsing each take
/// seconds, and the two overlap on two cores (issue 24: restart within 2 s). The records
/// come out in the rows' order; an unreadable one is skipped and logged as by
/// [`load_json`].
fn load_json_pipelined<T: serde::de::DeserializeOwned + Send>(
    conn: &Connection,
    sql: &str,
    what: &str,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    load_json_chunked(conn, sql, what, |chunk| out.extend(chunk))?;
    Ok(out)
}

/// As [`load_json_pipelined`], handing the records to `give` a parsed chunk at a time
/// (on the parsing thread) instead of collecting them.
fn load_json_chunked<T: serde::de::DeserializeOwned + Send>(
    conn: &Connection,
    sql: &str,
    what: &str,
    give: impl FnMut(Vec<T>) + Send,
) -> Result<(), StoreError> {
    load_rows_chunked(
        conn,
        sql,
        what,
        |[data], []| serde_json::from_str::<T>(data),
        give,
    )
}

/// As [`load_json_chunked`], each row parsed by `parse` (on the parsing thread) from its
/// columns: the first `TEXTS` of the query are texts, the next `INTS` integers (the
/// registrations: their JSON; the events: key, JSON, number).
fn load_rows_chunked<T: Send, E: std::fmt::Display, const TEXTS: usize, const INTS: usize>(
    conn: &Connection,
    sql: &str,
    what: &str,
    mut parse: impl FnMut([&str; TEXTS], [i64; INTS]) -> Result<T, E> + Send,
    mut give: impl FnMut(Vec<T>) + Send,
) -> Result<(), StoreError> {
    /// A chunk's texts in one buffer (one allocation a chunk, not a row), where each
    /// text ends in it (`TEXTS` a row), and the rows' integers (`INTS` a row).
    type Chunk = (String, Vec<usize>, Vec<i64>);
    const { assert!(TEXTS > 0, "a row has a text column") };
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([])?;
    std::thread::scope(|scope| {
        // Emptied chunks go back to be filled again: a new one each time would be fresh
        // pages from the kernel, zeroed, every 1.7 MB of a million rows.
        let (tx, rx) = mpsc::sync_channel::<Chunk>(4);
        let (back_tx, back_rx) = mpsc::channel::<Chunk>();
        let parser = std::thread::Builder::new()
            .name("store-load".into())
            .spawn_scoped(scope, move || {
                for (mut text, mut ends, mut ints) in rx {
                    let mut out = Vec::with_capacity(ends.len() / TEXTS);
                    let mut start = 0;
                    for (r, row_ends) in ends.chunks(TEXTS).enumerate() {
                        let texts: [&str; TEXTS] = std::array::from_fn(|i| {
                            let from = if i == 0 { start } else { row_ends[i - 1] };
                            &text[from..row_ends[i]]
                        });
                        let row_ints: [i64; INTS] = std::array::from_fn(|j| ints[r * INTS + j]);
                        match parse(texts, row_ints) {
                            Ok(v) => out.push(v),
                            Err(e) => tracing::error!("store: skipping unreadable {what}: {e}"),
                        }
                        start = row_ends[TEXTS - 1];
                    }
                    give(out);
                    text.clear();
                    ends.clear();
                    ints.clear();
                    let _ = back_tx.send((text, ends, ints));
                }
            })
            .map_err(|e| {
                StoreError::Commit(format!("cannot start the parsing of stored {what}s: {e}"))
            })?;
        let new_chunk = || {
            back_rx.try_recv().unwrap_or_else(|_| {
                (
                    String::new(),
                    Vec::with_capacity(LOAD_CHUNK * TEXTS),
                    Vec::with_capacity(LOAD_CHUNK * INTS),
                )
            })
        };
        let mut chunk = new_chunk();
        let mut in_chunk = 0;
        let read = (|| -> Result<(), StoreError> {
            while let Some(row) = rows.next()? {
                let first = chunk.0.is_empty();
                for i in 0..TEXTS {
                    let data = row.get_ref(i)?;
                    let data = data.as_str().map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(i, data.data_type(), Box::new(e))
                    })?;
                    if first && i == 0 {
                        // Rows alike: room for a chunk of rows like the first (at most
                        // 4 MiB a text column).
                        chunk.0.reserve(data.len().min(1024) * LOAD_CHUNK * TEXTS);
                    }
                    chunk.0.push_str(data);
                    chunk.1.push(chunk.0.len());
                }
                for j in 0..INTS {
                    chunk.2.push(row.get(TEXTS + j)?);
                }
                in_chunk += 1;
                if in_chunk == LOAD_CHUNK {
                    in_chunk = 0;
                    let full = std::mem::replace(&mut chunk, new_chunk());
                    if tx.send(full).is_err() {
                        break;
                    }
                }
            }
            if in_chunk > 0 {
                let _ = tx.send(std::mem::replace(&mut chunk, new_chunk()));
            }
            Ok(())
        })();
        drop(tx);
        parser
            .join()
            .map_err(|_| StoreError::Commit(format!("the parsing of stored {what}s panicked")))?;
        read
    })
}

/// A registration's stored JSON: the fields of [`Registration`], in its order and with its
/// serde attributes (so the same text as `serde_json::to_string` of it), with the object
/// list given already escaped.
#[derive(serde::Serialize)]
struct RegistrationJson<'a> {
    id: &'a str,
    domain: &'a str,
    name: &'a str,
    ept: Option<&'a str>,
    lifetime_s: u32,
    binding: &'a str,
    lwm2m: Option<&'a str>,
    queue: bool,
    peer: &'a connectord_model::PeerRef,
    links: &'a serde_json::value::RawValue,
    registered_at_ms: u64,
    expires_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
}

impl SqliteStore {
    /// `reg` as stored, byte for byte `serde_json::to_string(reg)`. Decision: the object
    /// list is most of a registration's JSON, and escaping it anew each time cost about
    /// 1 400 instructions of every registration (callgrind, issue 24: 56 546 against
    /// 55 185 per registration of the bench's fleet); the devices of one firmware share one
    /// list (`Registration::links`, one `Arc` for the same text), so the escaped text of
    /// the last list put is kept and used again while the next registration has the same
    /// `Arc`. (Destructured whole: a field added to `Registration` fails to compile here
    /// until it is added to [`RegistrationJson`].)
    fn registration_json(&self, reg: &Registration) -> Result<String, StoreError> {
        let Registration {
            id,
            domain,
            name,
            ept,
            lifetime_s,
            binding,
            lwm2m,
            queue,
            peer,
            links,
            registered_at_ms,
            expires_at_ms,
            node,
        } = reg;
        let mut cache = self.links_json.lock().unwrap_or_else(|p| p.into_inner());
        let escaped = match &*cache {
            Some((l, escaped)) if Arc::ptr_eq(l, links) => escaped,
            _ => {
                let escaped = serde_json::value::RawValue::from_string(to_json(&**links)?)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                &cache.insert((Arc::clone(links), escaped)).1
            }
        };
        to_json(&RegistrationJson {
            id,
            domain,
            name,
            ept: ept.as_deref(),
            lifetime_s: *lifetime_s,
            binding,
            lwm2m: lwm2m.as_deref(),
            queue: *queue,
            peer,
            links: escaped,
            registered_at_ms: *registered_at_ms,
            expires_at_ms: *expires_at_ms,
            node: node.as_deref(),
        })
    }
}

/// A stored registration's JSON as read at start: [`Registration`]'s fields and serde
/// attributes, with the object list borrowed as written (still escaped).
#[derive(serde::Deserialize)]
struct RegistrationRow<'a> {
    id: String,
    domain: String,
    name: String,
    ept: Option<String>,
    lifetime_s: u32,
    binding: String,
    lwm2m: Option<String>,
    queue: bool,
    peer: connectord_model::PeerRef,
    #[serde(borrow)]
    links: &'a serde_json::value::RawValue,
    registered_at_ms: u64,
    expires_at_ms: u64,
    #[serde(default)]
    node: Option<String>,
}

/// The object lists of the registrations read at start, by their stored (escaped) text.
/// Decision (issue 24, restart within 2 s): the devices of one firmware store the same
/// list, most of a row's text; one read like the last one (or one of the few before it)
/// takes the same `Arc<str>` without unescaping and copying it again, and the registry
/// sees the same `Arc` and looks it up once ([`Registration::links`]). At most
/// [`StoredLists::MAX`] lists are kept; a fleet whose lists all differ pays a failed
/// lookup per row.
#[derive(Default)]
struct StoredLists {
    last: Option<(Box<str>, Arc<str>)>,
    seen: HashMap<Box<str>, Arc<str>>,
}

impl StoredLists {
    const MAX: usize = 256;

    /// A stored registration (as `serde_json::from_str::<Registration>` reads it).
    fn parse(&mut self, data: &str) -> serde_json::Result<Registration> {
        let row: RegistrationRow<'_> = serde_json::from_str(data)?;
        let links = self.links(row.links.get())?;
        // Every field named: one added to `Registration` fails to compile here until it
        // is read into `RegistrationRow`.
        Ok(Registration {
            id: row.id,
            domain: row.domain,
            name: row.name,
            ept: row.ept,
            lifetime_s: row.lifetime_s,
            binding: row.binding,
            lwm2m: row.lwm2m,
            queue: row.queue,
            peer: row.peer,
            links,
            registered_at_ms: row.registered_at_ms,
            expires_at_ms: row.expires_at_ms,
            node: row.node,
        })
    }

    /// The list whose stored JSON string is `raw`.
    fn links(&mut self, raw: &str) -> serde_json::Result<Arc<str>> {
        if let Some((text, links)) = &self.last
            && **text == *raw
        {
            return Ok(Arc::clone(links));
        }
        let links = match self.seen.get(raw) {
            Some(links) => Arc::clone(links),
            None => {
                let links: Arc<str> = serde_json::from_str::<String>(raw)?.into();
                if self.seen.len() >= Self::MAX {
                    self.seen.clear();
                }
                self.seen.insert(raw.into(), Arc::clone(&links));
                links
            }
        };
        self.last = Some((raw.into(), Arc::clone(&links)));
        Ok(links)
    }
}

impl RegistrationStore for SqliteStore {
    fn load_registrations(&self) -> Pending<Vec<Registration>> {
        self.submit(|conn| {
            load_json_pipelined(conn, "SELECT data FROM registrations", "registration")
        })
    }

    fn stream_registrations(&self) -> RegistrationChunks {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Taken by the first run: a run again (the batch redone after another job failed)
        // gives nothing twice.
        let mut tx = Some(tx);
        let done = self.submit(move |conn| {
            let Some(tx) = tx.take() else {
                return Ok(());
            };
            let mut lists = StoredLists::default();
            load_rows_chunked(
                conn,
                "SELECT data FROM registrations",
                "registration",
                move |[data], []| lists.parse(data),
                |c| {
                    let _ = tx.send(c);
                },
            )
        });
        RegistrationChunks::Chunks {
            rx,
            done: Some(done),
        }
    }

    /// Decision: the registration is serialized here, on the caller's thread, before the
    /// job is queued; the job on the store thread (one thread for every write of the
    /// daemon) only binds the text to statements prepared once ([`Db`]).
    fn put_registration(&self, reg: Registration) -> Pending<()> {
        let data = match self.registration_json(&reg) {
            Ok(data) => data,
            Err(e) => return Pending::failed(e),
        };
        let Registration {
            id, domain, name, ..
        } = reg;
        self.submit(move |conn| {
            conn.put_registration
                .borrow_mut()
                .execute(params![id, domain, name, data])?;
            Ok(())
        })
    }

    fn delete_registration(&self, id: String) -> Pending<()> {
        self.submit(move |conn| {
            conn.prepare_cached("DELETE FROM registrations WHERE id = ?1")?
                .execute(params![id])?;
            Ok(())
        })
    }
}

impl EventLog for SqliteStore {
    fn load_channels(&self) -> Pending<Vec<ChannelRecord>> {
        self.submit(|conn| load_json(conn, "SELECT data FROM channels", "channel"))
    }

    fn put_channel(&self, channel: ChannelRecord) -> Pending<()> {
        self.submit(move |conn| {
            upsert_json(
                conn,
                "INSERT INTO channels (key_id, data) VALUES (?1, ?2)
                 ON CONFLICT (key_id) DO UPDATE SET data = excluded.data",
                &channel.key_id,
                &channel,
            )
        })
    }

    fn delete_channel(&self, key_id: String) -> Pending<()> {
        self.submit(move |conn| {
            conn.journal.borrow_mut().delete_key(key_id.clone());
            conn.prepare_cached("DELETE FROM channels WHERE key_id = ?1")?
                .execute(params![key_id])?;
            Ok(())
        })
    }

    fn load_events(&self) -> Pending<Vec<StoredEvent>> {
        self.submit(load_events_pipelined)
    }

    fn load_events_of(&self, key_id: String) -> Pending<Vec<StoredEvent>> {
        self.submit(move |conn| {
            let mut out = Vec::new();
            conn.journal
                .borrow_mut()
                .read_key(&conn.journal_sql, &key_id, |r| out.extend(record_event(&r)))?;
            out.sort_by_key(|e| e.seq);
            Ok(out)
        })
    }

    fn append_events(&self, events: Vec<(String, Event)>, answered: Option<u64>) -> Appended {
        // Numbered under the lock in submission order, so that the store thread writes
        // them in the order of their numbers ([`EPOCH_SHIFT`]).
        let mut last = self.numbered.lock().unwrap_or_else(|p| p.into_inner());
        let mut numbered = Vec::with_capacity(events.len());
        let mut seqs = Vec::with_capacity(events.len());
        for (key_id, event) in events {
            let n = match last.get_mut(key_id.as_str()) {
                Some(n) => {
                    *n += 1;
                    *n
                }
                None => {
                    last.insert(key_id.clone(), 1);
                    1
                }
            };
            let seq = self.epoch << EPOCH_SHIFT | n;
            seqs.push(seq);
            numbered.push((key_id, seq, event));
        }
        let durable = self.submit(move |conn| {
            let mut journal = conn.journal.borrow_mut();
            for (key_id, seq, event) in &numbered {
                journal.put_event(key_id.clone(), *seq, record_json::event(event));
            }
            if let Some(row) = answered {
                journal.delete_request(row);
            }
            Ok(())
        });
        drop(last);
        Appended { seqs, durable }
    }

    fn delete_events_through(&self, key_id: String, seq: u64) -> Pending<()> {
        self.submit(move |conn| {
            conn.journal
                .borrow_mut()
                .delete_events_through(key_id.clone(), seq);
            Ok(())
        })
    }
}

/// A journal record's event: its key id, number and JSON; `None` for a request's record,
/// or (logged) for JSON that is not UTF-8.
fn event_json<'a>(r: &journal::Record<'a>) -> Option<(&'a str, u64, &'a str)> {
    let journal::Ident::Event(key_id, seq) = r.ident else {
        return None;
    };
    match std::str::from_utf8(r.json) {
        Ok(json) => Some((key_id, seq, json)),
        Err(e) => {
            tracing::error!("store: skipping unreadable event: {e}");
            None
        }
    }
}

/// A journal record's stored event ([`event_json`], [`stored_event`]).
fn record_event(r: &journal::Record<'_>) -> Option<StoredEvent> {
    event_json(r).and_then(|(key_id, seq, json)| stored_event(key_id, seq, json))
}

/// The stored event of a record's parts; an unreadable one is logged and skipped.
fn stored_event(key_id: &str, seq: u64, json: &str) -> Option<StoredEvent> {
    match record_json::read_event(json) {
        Ok(event) => Some(StoredEvent {
            key_id: key_id.to_string(),
            seq,
            event,
        }),
        Err(e) => {
            tracing::error!("store: skipping unreadable event: {e}");
            None
        }
    }
}

/// The stored events in (key id, sequence) order, parsed on a thread of their own while
/// this one reads on, in pieces of [`LOAD_CHUNK`] records.
///
/// Decision (issue 24, restart): a key whose queue filled during an outage holds up to
/// `notifications.max_queued_per_key` events, registration events of about 1 KB each
/// (89 640 in the bench's expiry scenario); read and parsed on the store thread alone they
/// took 0.3 s of the restart after the registrations, with the second core idle.
fn load_events_pipelined(db: &Db<'_>) -> Result<Vec<StoredEvent>, StoreError> {
    /// A chunk's key ids and JSON in one buffer, and where each record's key id and JSON
    /// end in it, with its number.
    type Chunk = (String, Vec<(usize, usize, u64)>);
    let mut out = std::thread::scope(|scope| -> Result<Vec<StoredEvent>, StoreError> {
        let (tx, rx) = mpsc::sync_channel::<Chunk>(4);
        let parser = std::thread::Builder::new()
            .name("store-load".into())
            .spawn_scoped(scope, move || {
                let mut out = Vec::new();
                for (text, ends) in rx {
                    let mut start = 0;
                    for (key_end, end, seq) in ends {
                        out.extend(stored_event(
                            &text[start..key_end],
                            seq,
                            &text[key_end..end],
                        ));
                        start = end;
                    }
                }
                out
            })
            .map_err(|e| {
                StoreError::Commit(format!("cannot start the parsing of stored events: {e}"))
            })?;
        let mut chunk = Chunk::default();
        let read = db
            .journal
            .borrow_mut()
            .read(&db.journal_sql, journal::Kind::Event, |r| {
                let Some((key_id, seq, json)) = event_json(&r) else {
                    return;
                };
                chunk.0.push_str(key_id);
                let key_end = chunk.0.len();
                chunk.0.push_str(json);
                chunk.1.push((key_end, chunk.0.len(), seq));
                if chunk.1.len() == LOAD_CHUNK {
                    let _ = tx.send(std::mem::take(&mut chunk));
                }
            });
        if !chunk.1.is_empty() {
            let _ = tx.send(chunk);
        }
        drop(tx);
        let parsed = parser
            .join()
            .map_err(|_| StoreError::Commit("the parsing of stored events panicked".into()));
        read?;
        parsed
    })?;
    out.sort_by(|a, b| (a.key_id.as_str(), a.seq).cmp(&(b.key_id.as_str(), b.seq)));
    Ok(out)
}

impl RequestStore for SqliteStore {
    fn load_requests(&self) -> Pending<Vec<RequestJob>> {
        self.submit(|conn| {
            let mut jobs = Vec::new();
            conn.journal
                .borrow_mut()
                .read(&conn.journal_sql, journal::Kind::Request, |r| {
                    let journal::Ident::Request(row) = r.ident else {
                        return;
                    };
                    match serde_json::from_slice::<RequestJob>(r.json) {
                        Ok(mut job) => {
                            job.row = row;
                            jobs.push(job);
                        }
                        Err(e) => tracing::error!("store: skipping unreadable request: {e}"),
                    }
                })?;
            jobs.sort_by_key(|j| j.row);
            Ok(jobs)
        })
    }

    fn put_request(&self, job: &RequestJob) -> Pending<u64> {
        // Rendered here, off the store thread (which every job of the daemon shares).
        let json = record_json::request(job);
        self.submit(move |conn| {
            // Rows count up from one more than the largest stored, so a number can come
            // back after a restart if the largest row was deleted; that row's job was
            // answered by then (jobs run in submission order), and nothing else refers
            // to it.
            conn.journal
                .borrow_mut()
                // A copy: the job runs again if its batch is redone.
                .put_request(&conn.journal_sql, json.clone())
        })
    }

    fn delete_request(&self, row: u64) -> Pending<()> {
        self.submit(move |conn| {
            conn.journal.borrow_mut().delete_request(row);
            Ok(())
        })
    }
}

impl PluginStateStore for SqliteStore {
    fn plugin_state_get(&self, plugin: String, key: String) -> Pending<Option<Vec<u8>>> {
        self.submit(move |conn| {
            Ok(conn
                .prepare_cached("SELECT value FROM plugin_state WHERE plugin = ?1 AND key = ?2")?
                .query_row(params![plugin, key], |r| r.get::<_, Vec<u8>>(0))
                .optional()?)
        })
    }

    fn plugin_state_put(&self, plugin: String, key: String, value: Vec<u8>) -> Pending<()> {
        self.submit(move |conn| {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO plugin_state (plugin, key, value) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![plugin, key, value])?;
            Ok(())
        })
    }

    fn plugin_state_delete(&self, plugin: String, key: String) -> Pending<()> {
        self.submit(move |conn| {
            conn.prepare_cached("DELETE FROM plugin_state WHERE plugin = ?1 AND key = ?2")?
                .execute(params![plugin, key])?;
            Ok(())
        })
    }

    fn plugin_state_keys(&self, plugin: String, prefix: String) -> Pending<Vec<String>> {
        self.submit(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT key FROM plugin_state WHERE plugin = ?1 AND substr(key, 1, length(?2)) = ?2 ORDER BY key",
            )?;
            let rows = stmt.query_map(params![plugin, prefix], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r?);
            }
            Ok(out)
        })
    }
}

impl SubscriptionStore for SqliteStore {
    fn load_subscriptions(&self) -> Pending<Vec<SubscriptionRecord>> {
        self.submit(|conn| {
            load_json(
                conn,
                "SELECT data FROM subscriptions ORDER BY key_id, ep, path",
                "subscription",
            )
        })
    }

    fn put_subscription(&self, sub: SubscriptionRecord) -> Pending<()> {
        self.submit(move |conn| {
            conn.prepare_cached("INSERT OR REPLACE INTO subscriptions (key_id, ep, path, data) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![sub.key_id, sub.ep, sub.path, to_json(&sub)?])?;
            Ok(())
        })
    }

    fn delete_subscriptions(
        &self,
        key_id: String,
        ep: Option<String>,
        path: Option<String>,
    ) -> Pending<()> {
        self.submit(move |conn| {
            match (&ep, &path) {
                (None, _) => conn.execute(
                    "DELETE FROM subscriptions WHERE key_id = ?1",
                    params![key_id],
                )?,
                (Some(ep), None) => conn.execute(
                    "DELETE FROM subscriptions WHERE key_id = ?1 AND ep = ?2",
                    params![key_id, ep],
                )?,
                (Some(ep), Some(path)) => conn.execute(
                    "DELETE FROM subscriptions WHERE key_id = ?1 AND ep = ?2 AND path = ?3",
                    params![key_id, ep, path],
                )?,
            };
            Ok(())
        })
    }

    fn load_presubscriptions(&self) -> Pending<Vec<PresubRecord>> {
        self.submit(|conn| {
            load_json(
                conn,
                "SELECT data FROM presubscriptions",
                "pre-subscription",
            )
        })
    }

    fn replace_presubscriptions(&self, rec: PresubRecord) -> Pending<()> {
        self.submit(move |conn| {
            conn.execute(
                "DELETE FROM subscriptions WHERE key_id = ?1",
                params![rec.key_id],
            )?;
            conn.execute(
                "INSERT INTO presubscriptions (key_id, data) VALUES (?1, ?2)
                 ON CONFLICT (key_id) DO UPDATE SET data = excluded.data",
                params![rec.key_id, to_json(&rec)?],
            )?;
            Ok(())
        })
    }
}

impl QuotaStore for SqliteStore {
    fn load_hour_counts(&self) -> Pending<Vec<HourCount>> {
        self.submit(|conn| {
            let mut stmt = conn.prepare("SELECT domain, hour, count FROM limit_counts")?;
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let (domain, hour, count): (String, i64, i64) =
                    (row.get(0)?, row.get(1)?, row.get(2)?);
                match (u64::try_from(hour), u64::try_from(count)) {
                    (Ok(hour), Ok(count)) => out.push(HourCount {
                        domain,
                        hour,
                        count,
                    }),
                    _ => tracing::error!(
                        "store: skipping unreadable limit count of domain {domain:?} (hour {hour}, count {count})"
                    ),
                }
            }
            Ok(out)
        })
    }

    fn save_hour_counts(&self, counts: Vec<HourCount>, keep_from: u64) -> Pending<()> {
        self.submit(move |conn| {
            let mut put = conn.prepare_cached(
                "INSERT INTO limit_counts (domain, hour, count) VALUES (?1, ?2, ?3)
                 ON CONFLICT (domain, hour) DO UPDATE SET count = excluded.count",
            )?;
            for c in &counts {
                put.execute(params![
                    c.domain,
                    i64::try_from(c.hour).unwrap_or(i64::MAX),
                    i64::try_from(c.count).unwrap_or(i64::MAX)
                ])?;
            }
            conn.prepare_cached("DELETE FROM limit_counts WHERE hour < ?1")?
                .execute(params![i64::try_from(keep_from).unwrap_or(i64::MAX)])?;
            Ok(())
        })
    }
}

/// A stored time (ms) as `u64`; a negative one (a hand-edited row) reads as 0.
fn ms(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A time (ms) to store.
fn ms_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl CredentialStore for SqliteStore {
    fn load_psks(&self) -> Pending<Vec<PskRecord>> {
        self.submit(|conn| {
            let mut stmt =
                conn.prepare("SELECT domain, ep, identity, key, created_ms FROM device_psks")?;
            let rows = stmt.query_map([], |r| {
                Ok(PskRecord {
                    domain: r.get(0)?,
                    ep: r.get(1)?,
                    identity: r.get(2)?,
                    key: r.get(3)?,
                    created_ms: ms(r.get(4)?),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn load_certificates(&self) -> Pending<Vec<CertificateRecord>> {
        self.submit(|conn| {
            let mut stmt = conn.prepare(
                "SELECT serial, domain, ep, issued_ms, not_after_ms, revoked_ms FROM device_certificates",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(CertificateRecord {
                    serial: r.get(0)?,
                    domain: r.get(1)?,
                    ep: r.get(2)?,
                    issued_ms: ms(r.get(3)?),
                    not_after_ms: ms(r.get(4)?),
                    revoked_ms: r.get::<_, Option<i64>>(5)?.map(ms),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn put_psk(&self, rec: PskRecord) -> Pending<()> {
        self.submit(move |conn| {
            conn.prepare_cached(
                "INSERT INTO device_psks (domain, ep, identity, key, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (domain, ep) DO UPDATE SET identity = excluded.identity,
                     key = excluded.key, created_ms = excluded.created_ms",
            )?
            .execute(params![
                rec.domain,
                rec.ep,
                rec.identity,
                rec.key,
                ms_sql(rec.created_ms)
            ])?;
            Ok(())
        })
    }

    fn put_certificate(&self, rec: CertificateRecord) -> Pending<()> {
        self.submit(move |conn| {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO device_certificates
                 (serial, domain, ep, issued_ms, not_after_ms, revoked_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                rec.serial,
                rec.domain,
                rec.ep,
                ms_sql(rec.issued_ms),
                ms_sql(rec.not_after_ms),
                rec.revoked_ms.map(ms_sql)
            ])?;
            Ok(())
        })
    }

    fn revoke_device(&self, domain: String, ep: String, revoked_ms: u64) -> Pending<()> {
        self.submit(move |conn| {
            conn.prepare_cached("DELETE FROM device_psks WHERE domain = ?1 AND ep = ?2")?
                .execute(params![domain, ep])?;
            conn.prepare_cached(
                "UPDATE device_certificates SET revoked_ms = ?3
                 WHERE domain = ?1 AND ep = ?2 AND revoked_ms IS NULL",
            )?
            .execute(params![domain, ep, ms_sql(revoked_ms)])?;
            Ok(())
        })
    }
}

impl Feed for SqliteStore {
    fn external_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.external.clone())
    }

    fn health(&self) -> Health {
        self.health.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    fn reg(id: &str, name: &str) -> Registration {
        Registration {
            id: id.into(),
            domain: "default".into(),
            name: name.into(),
            ept: None,
            lifetime_s: 60,
            binding: "U".into(),
            lwm2m: None,
            queue: false,
            peer: connectord_model::PeerRef::udp(
                SocketAddr::from(([127, 0, 0, 1], 2)),
                SocketAddr::from(([127, 0, 0, 1], 1)),
            ),
            links: "</3/0>".into(),
            registered_at_ms: 1,
            expires_at_ms: 2,
            node: None,
        }
    }

    /// A registration's stored JSON is serde's text of it, whether its object list was
    /// escaped anew or kept from the last put (the same `Arc`), with every optional field
    /// absent and present.
    #[tokio::test]
    async fn registration_json_is_serdes_text_with_the_list_kept_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let list: Arc<str> = Arc::from("</>;rt=\"oma.lwm2m\";ct=11543,</1/0>,</3/0>,<\\x\u{1}é>");
        let mut a = reg("a", "n1");
        a.links = Arc::clone(&list);
        let mut b = a.clone();
        b.id = "b".into();
        b.ept = Some("t\"1".into());
        b.lwm2m = Some("1.1".into());
        b.queue = true;
        b.node = Some("n2".into());
        let mut c = reg("c", "n3");
        c.links = Arc::from(&*list);
        for r in [&a, &b, &b, &c, &a] {
            assert_eq!(
                s.registration_json(r).unwrap(),
                serde_json::to_string(r).unwrap()
            );
        }
        // And it reads back.
        let back: Registration = serde_json::from_str(&s.registration_json(&b).unwrap()).unwrap();
        assert_eq!(back, b);
    }

    /// Counts the store's commits.
    #[derive(Default)]
    struct Commits(std::sync::atomic::AtomicUsize);

    impl CommitObserver for Commits {
        fn observe(&self, _: Duration) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// While the store is busy (its last batch held `GATHER_AFTER` jobs or more), a job
    /// waits the commit delay for company: one sent meanwhile shares its commit. A lone
    /// writer's jobs (batches of one) are committed without waiting.
    #[tokio::test]
    async fn a_busy_store_gathers_jobs_into_one_commit_and_a_lone_writer_is_not_delayed() {
        let delay = Duration::from_secs(2);
        let dir = tempfile::tempdir().unwrap();
        let commits = Arc::new(Commits::default());
        let s = SqliteStore::open_with(dir.path(), commits.clone(), delay).unwrap();
        let put = |k: &str| s.plugin_state_put("p".into(), k.into(), b"v".to_vec());
        // The commits counted once the count stays put (a batch is counted just after its
        // jobs are answered).
        let count = || async {
            let mut n = commits.0.load(Ordering::SeqCst);
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let now = commits.0.load(Ordering::SeqCst);
                if now == n {
                    return n;
                }
                n = now;
            }
        };
        // A lone writer: one job at a time, each its own commit, none waiting the delay.
        for k in ["a", "b", "c"] {
            let (before, t) = (count().await, Instant::now());
            put(k).await.unwrap();
            assert!(t.elapsed() < delay, "a lone write waited {:?}", t.elapsed());
            assert_eq!(count().await, before + 1);
        }
        // Many writers: 200 jobs sent at once, so that a batch holds GATHER_AFTER or more
        // while the first commits.
        let many: Vec<_> = (0..200).map(|i| put(&format!("m{i}"))).collect();
        for p in many {
            p.await.unwrap();
        }
        // Busy now: the next job waits, and one sent 200 ms later joins its commit.
        let before = count().await;
        let first = put("x");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = put("y");
        first.await.unwrap();
        second.await.unwrap();
        assert_eq!(
            count().await,
            before + 1,
            "two jobs 200 ms apart in one commit"
        );
        // Two jobs are not company: the next is committed at once again.
        let t = Instant::now();
        put("z").await.unwrap();
        assert!(t.elapsed() < delay, "a lone write waited {:?}", t.elapsed());
        assert_eq!(count().await, before + 2);
        assert_eq!(
            s.plugin_state_get("p".into(), "y".into()).await.unwrap(),
            Some(b"v".to_vec())
        );
    }

    /// Dropping the handle waits for the store thread: the database is closed when the
    /// drop returns (the last connection's close checkpoints and removes the WAL file).
    #[tokio::test]
    async fn a_dropped_store_has_closed_its_database() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        s.put_registration(reg("a", "n1")).await.unwrap();
        let wal = dir.path().join("connectord.db-wal");
        assert!(wal.exists(), "written through the WAL");
        drop(s);
        assert!(!wal.exists(), "closed by the time the drop returned");
        // Reopened up to date, its start-up check runs on a connection of its own
        // ([`Gate`]); a drop before anyone waited for the check waits for it too.
        for i in 0..20 {
            let s = SqliteStore::open(dir.path()).unwrap();
            if i % 2 == 0 {
                s.put_registration(reg("b", "n2")).await.unwrap();
            } else {
                assert!(!s.load_registrations().await.unwrap().is_empty());
            }
            drop(s);
            assert!(!wal.exists(), "closed by the time the drop returned ({i})");
        }
    }

    /// A database of `n` registrations and a table of filler rows whose pages are the
    /// file's last; the last `junk_pages` of them are overwritten with junk (the
    /// registrations' pages stay readable, `PRAGMA quick_check` fails).
    async fn damaged_database(dir: &Path, n: usize, junk_pages: u64) {
        {
            let s = SqliteStore::open(dir).unwrap();
            for i in 0..n {
                s.put_registration(reg(&format!("id{i}"), &format!("n{i}")))
                    .await
                    .unwrap();
            }
        }
        let path = dir.join(DB_FILE);
        let c = Connection::open(&path).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        c.execute_batch(
            "CREATE TABLE filler (b BLOB);
             WITH RECURSIVE i(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM i WHERE x < 200)
             INSERT INTO filler SELECT randomblob(1500) FROM i;",
        )
        .unwrap();
        drop(c);
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        assert!(len > 4096 * (junk_pages + 20), "{len}");
        f.seek(std::io::SeekFrom::Start(len - 4096 * junk_pages))
            .unwrap();
        let junk: Vec<u8> = (0..4096 * junk_pages).map(|i| (i * 7 + 13) as u8).collect();
        f.write_all(&junk).unwrap();
        f.sync_all().unwrap();
    }

    /// Issue 24 (restart within 2 s): an up-to-date database opens at once and is read
    /// while `PRAGMA quick_check` runs on its own connection; nothing is committed before
    /// the check has passed, and when it fails every write and the start-up check get its
    /// verdict, naming the file and the cause.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_database_is_read_but_never_written_and_fails_the_startup_check() {
        let dir = tempfile::tempdir().unwrap();
        damaged_database(dir.path(), 30, 4).await;
        let path = dir.path().join(DB_FILE);
        let s = SqliteStore::open(dir.path()).expect("the check no longer runs inside the open");
        assert_eq!(s.load_registrations().await.unwrap().len(), 30);
        let write = s.put_registration(reg("new", "new")).await;
        let check = s.startup_check().await;
        for (what, r) in [("the write", write), ("the start-up check", check)] {
            match r {
                Err(StoreError::Unusable { path: p, cause }) => {
                    assert_eq!(p, path, "{what}");
                    assert!(cause.contains("corrupt"), "{what}: {cause}");
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        drop(s);
        let c = Connection::open(&path).unwrap();
        let ids: Vec<String> = c
            .prepare("SELECT id FROM registrations WHERE id = 'new'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(ids.is_empty(), "nothing committed: {ids:?}");
    }

    /// The start-up check of a sound database passes and commits this open's epoch:
    /// events numbered before it and after it carry the epoch, and the next open counts
    /// on from it.
    #[tokio::test]
    async fn the_startup_check_of_a_sound_database_commits_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let s = SqliteStore::open(dir.path()).unwrap();
            s.put_registration(reg("a", "n1")).await.unwrap();
            s.epoch
        };
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.epoch, first + 1);
        s.startup_check().await.unwrap();
        drop(s);
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let stored: i64 = c
            .query_row("SELECT epoch FROM event_epoch WHERE id = 0", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(stored as u64, first + 1);
        drop(c);
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.epoch, first + 2);
        // The registrations come in pieces and whole alike.
        let mut chunks = s.stream_registrations();
        let mut ids = Vec::new();
        while let Some(c) = chunks.next().await {
            ids.extend(c.unwrap().into_iter().map(|r| r.id));
        }
        assert_eq!(ids, vec!["a".to_string()]);
    }

    /// The registrations streamed at start are what serde reads of their stored text,
    /// whichever lists repeat (kept by their escaped text: the same `Arc` for the same
    /// list), and a row that does not read is skipped, not the rest.
    #[tokio::test]
    async fn streamed_registrations_are_serdes_reading_with_lists_shared() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let lists = [
            "</>;rt=\"oma.lwm2m\";ct=11543,</1/0>,</3/0>,<\\x\u{1}\u{e9}>",
            "</3/0>",
            "</3/0>,</5/0>",
        ];
        let mut put = Vec::new();
        // Interleaved (not only the last list again), more lists than are kept
        // ([`StoredLists::MAX`]), odd names and every optional field both ways.
        for i in 0..(StoredLists::MAX + 40) {
            let mut r = reg(&format!("id{i:04}"), &format!("n\"{i}\\"));
            r.links = if i < StoredLists::MAX / 2 {
                Arc::from(lists[i % 3])
            } else {
                Arc::from(format!("</{i}/0>").as_str())
            };
            if i % 2 == 0 {
                r.ept = Some("t\"1".into());
                r.lwm2m = Some("1.1".into());
                r.node = Some("n-1".into());
                r.queue = true;
            }
            r.expires_at_ms = i as u64;
            put.push(r.clone());
            s.put_registration(r).await.unwrap();
        }
        drop(s);
        // A row that does not read.
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.execute(
            "INSERT INTO registrations (id, domain, name, data) VALUES ('bad', 'default', 'bad', '{\"id\":1}')",
            [],
        )
        .unwrap();
        drop(c);
        let s = SqliteStore::open(dir.path()).unwrap();
        let mut chunks = s.stream_registrations();
        let mut got = Vec::new();
        while let Some(c) = chunks.next().await {
            got.extend(c.unwrap());
        }
        got.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(got, put);
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        for r in &got {
            let data: String = c
                .query_row(
                    "SELECT data FROM registrations WHERE id = ?1",
                    [&r.id],
                    |row| row.get(0),
                )
                .unwrap();
            assert_eq!(&serde_json::from_str::<Registration>(&data).unwrap(), r);
        }
        // The first lists were read once each: their registrations share them.
        for (i, r) in got.iter().enumerate().take(StoredLists::MAX / 2) {
            let first = &got[i % 3];
            assert!(Arc::ptr_eq(&r.links, &first.links), "{}", r.id);
        }
    }

    #[tokio::test]
    async fn put_replace_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SqliteStore::open(dir.path()).unwrap();
            s.put_registration(reg("a", "n1")).await.unwrap();
            s.put_registration(reg("b", "n2")).await.unwrap();
            // Same name, new id: replaces "a".
            s.put_registration(reg("c", "n1")).await.unwrap();
            s.delete_registration("b".into()).await.unwrap();
            s.delete_registration("absent".into()).await.unwrap();
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        let mut ids: Vec<String> = s
            .load_registrations()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        ids.sort();
        assert_eq!(ids, vec!["c"]);
    }

    #[tokio::test]
    async fn concurrent_writes_are_batched_and_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let pending: Vec<_> = (0..500)
            .map(|i| s.put_registration(reg(&format!("id{i}"), &format!("n{i}"))))
            .collect();
        for p in pending {
            p.await.unwrap();
        }
        drop(s);
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.load_registrations().await.unwrap().len(), 500);
    }

    #[tokio::test]
    async fn a_failing_job_does_not_undo_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let ok1 = s.put_registration(reg("a", "n1"));
        let bad = s.submit(|conn| {
            conn.execute(
                "INSERT INTO registrations (id, domain, name, data) VALUES ('x', 'd', 'n', '{}')",
                [],
            )?;
            conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
            Ok(())
        });
        let ok2 = s.put_registration(reg("b", "n2"));
        ok1.await.unwrap();
        assert!(bad.await.is_err());
        ok2.await.unwrap();
        let mut ids: Vec<String> = s
            .load_registrations()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            vec!["a", "b"],
            "the failed job's first insert was rolled back"
        );
    }

    fn job(id: &str, created_ms: u64) -> RequestJob {
        RequestJob {
            id: id.into(),
            key_id: "k".into(),
            domain: "default".into(),
            ep: "ep".into(),
            method: connectord_model::Method::Get,
            path: "/3/0/0".into(),
            payload: String::new(),
            content_format: None,
            accept: None,
            accept_fallback: false,
            as_json: false,
            created_ms,
            internal: false,
            device_request: None,
            attempts: 0,
            row: 0,
        }
    }

    #[tokio::test]
    async fn requests_are_kept_by_row_in_order_and_answered_with_their_events() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SqliteStore::open(dir.path()).unwrap();
            // Ids in reverse alphabetical order: the order kept must be the order stored.
            let pending = [
                s.put_request(&job("z", 1)),
                s.put_request(&job("y", 2)),
                s.put_request(&job("x", 3)),
            ];
            let mut rows = Vec::new();
            for p in pending {
                rows.push(p.await.unwrap());
            }
            assert!(rows.windows(2).all(|w| w[0] < w[1]), "{rows:?}");
            s.delete_request(rows[0]).await.unwrap();
            let ev = Event::new(connectord_model::Entry::DeRegistration("y".into()), 5);
            s.append_events(vec![("k".into(), ev)], Some(rows[1]))
                .durable
                .await
                .unwrap();
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        let left = s.load_requests().await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, "x");
        assert_ne!(left[0].row, 0, "a loaded request knows its row");
        assert_eq!(s.load_events().await.unwrap().len(), 1);
        // The row a loaded request carries is the one that removes it.
        s.delete_request(left[0].row).await.unwrap();
        assert!(s.load_requests().await.unwrap().is_empty());
    }

    /// A database in `dir` migrated to schema `version` only, as a release of then left it.
    fn at_schema(dir: &Path, version: usize) -> Connection {
        let conn = Connection::open(dir.join(DB_FILE)).unwrap();
        for sql in &MIGRATIONS[..version] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", version as i64)
            .unwrap();
        conn
    }

    /// The journal's rows, each as the identities of its records (`R<row>` or
    /// `E<key>/<seq>`), read through a connection of their own.
    fn journal_rows(dir: &Path) -> Vec<Vec<String>> {
        let conn = Connection::open(dir.join(DB_FILE)).unwrap();
        let mut stmt = conn
            .prepare("SELECT data FROM journal ORDER BY id")
            .unwrap();
        stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(|data| {
                let data = data.unwrap();
                let (records, err) = journal::decode(&data);
                assert_eq!(err, None);
                records
                    .iter()
                    .map(|r| match r.ident {
                        journal::Ident::Request(n) => format!("R{n}"),
                        journal::Ident::Event(k, s) => format!("E{k}/{}", s & 0xff_ffff),
                    })
                    .collect()
            })
            .collect()
    }

    fn note(n: u64) -> Event {
        Event::new(connectord_model::Entry::DeRegistration(format!("ep{n}")), n)
    }

    /// Issue 24: the records of a batch share rows of at most `MAX_ROW_RECORDS`, of one
    /// kind each; a row that loses records is written again with the live ones only, and
    /// deleted with the last; what is put and deleted in one batch is never written; a
    /// reopen loads exactly what is live, in order.
    #[tokio::test]
    async fn the_journal_keeps_exactly_the_live_records_in_rows_of_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        // One job: 100 requests and 70 events of two keys.
        let rows = s
            .submit(|db| {
                let mut j = db.journal.borrow_mut();
                let mut rows = Vec::new();
                for n in 0..100 {
                    rows.push(j.put_request(
                        &db.journal_sql,
                        record_json::request(&job(&format!("r{n}"), n)),
                    )?);
                }
                for n in 1..=70 {
                    let key = if n % 2 == 0 { "a" } else { "b" };
                    j.put_event(key.into(), n, record_json::event(&note(n)));
                }
                Ok(rows)
            })
            .await
            .unwrap();
        assert_eq!(rows, (1..=100).collect::<Vec<_>>());
        let before = journal_rows(dir.path());
        assert!(
            before.len() >= 4,
            "two rows of requests, two of events at least: {before:?}"
        );
        assert!(
            before
                .iter()
                .all(|r| !r.is_empty() && r.len() <= journal::MAX_ROW_RECORDS)
        );
        assert!(
            before
                .iter()
                .all(|r| r.iter().all(|i| i.starts_with('R'))
                    || r.iter().all(|i| i.starts_with('E'))),
            "one kind a row"
        );
        assert_eq!(before.iter().map(Vec::len).sum::<usize>(), 170);

        // Later batches: every other request answered (with an event), key a's events
        // through 40 delivered, and a request put and answered within one job.
        for row in (1..=100).step_by(2) {
            s.append_events(vec![("c".into(), note(row))], Some(row))
                .durable
                .await
                .unwrap();
        }
        s.delete_events_through("a".into(), 40).await.unwrap();
        let untouched = journal_rows(dir.path());
        s.submit(|db| {
            let mut j = db.journal.borrow_mut();
            let row = j.put_request(&db.journal_sql, record_json::request(&job("brief", 1)))?;
            j.delete_request(row);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(
            journal_rows(dir.path()),
            untouched,
            "put and deleted in one batch: never written"
        );

        let after = journal_rows(dir.path());
        let live: Vec<String> = after.concat();
        let mut want: Vec<String> = (2..=100).step_by(2).map(|n| format!("R{n}")).collect();
        want.extend((41..=70).filter(|n| n % 2 == 0).map(|n| format!("Ea/{n}")));
        want.extend((1..=70).filter(|n| n % 2 == 1).map(|n| format!("Eb/{n}")));
        let mut got = live.clone();
        got.retain(|i| !i.starts_with("Ec/"));
        got.sort();
        want.sort();
        assert_eq!(got, want, "the rows hold the live records and no others");
        assert!(after.iter().all(|r| !r.is_empty()), "no empty row is kept");
        drop(s);

        let s = SqliteStore::open(dir.path()).unwrap();
        let requests = s.load_requests().await.unwrap();
        assert_eq!(
            requests.iter().map(|j| j.row).collect::<Vec<_>>(),
            (2..=100).step_by(2).collect::<Vec<_>>()
        );
        assert_eq!(requests[0].id, "r1");
        let events = s.load_events().await.unwrap();
        let keys: Vec<(String, u64)> = events
            .iter()
            .map(|e| (e.key_id.clone(), e.seq & 0xff_ffff))
            .collect();
        let mut want: Vec<(String, u64)> = (42..=70).step_by(2).map(|n| ("a".into(), n)).collect();
        want.extend((1..=70).step_by(2).map(|n| ("b".into(), n)));
        let c: Vec<(String, u64)> = keys.iter().filter(|(k, _)| k == "c").cloned().collect();
        assert_eq!(c.len(), 50);
        assert_eq!(
            keys.iter()
                .filter(|(k, _)| k != "c")
                .cloned()
                .collect::<Vec<_>>(),
            want,
            "in (key, sequence) order"
        );
        assert_eq!(s.load_events_of("a".into()).await.unwrap().len(), 15);
        // A new request numbers above every stored one; deleting everything empties the
        // table.
        assert_eq!(s.put_request(&job("new", 9)).await.unwrap(), 101);
        for j in s.load_requests().await.unwrap() {
            s.delete_request(j.row).await.unwrap();
        }
        for key in ["a", "b", "c"] {
            s.delete_events_through(key.into(), u64::MAX).await.unwrap();
        }
        assert_eq!(journal_rows(dir.path()), Vec::<Vec<String>>::new());
    }

    /// Schema 10 moves the rows of `requests` and `events` into the journal, row numbers
    /// and sequence numbers kept.
    #[tokio::test]
    async fn schema_9_requests_and_events_migrate_into_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = at_schema(dir.path(), 9);
            for (row, id) in [(3, "c"), (5, "a:é")] {
                conn.execute(
                    "INSERT INTO requests (row, data) VALUES (?1, ?2)",
                    params![row, record_json::request(&job(id, 7))],
                )
                .unwrap();
            }
            for (key, seq) in [("k:1", 1u64 << 40 | 2), ("k:1", 1 << 40 | 1), ("", 9)] {
                conn.execute(
                    "INSERT INTO events (key_id, seq, data) VALUES (?1, ?2, ?3)",
                    params![key, seq as i64, record_json::event(&note(seq))],
                )
                .unwrap();
            }
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        let requests = s.load_requests().await.unwrap();
        assert_eq!(
            requests
                .iter()
                .map(|j| (j.row, j.id.as_str()))
                .collect::<Vec<_>>(),
            vec![(3, "c"), (5, "a:é")]
        );
        let events = s.load_events().await.unwrap();
        assert_eq!(
            events
                .iter()
                .map(|e| (e.key_id.as_str(), e.seq))
                .collect::<Vec<_>>(),
            vec![("", 9), ("k:1", 1 << 40 | 1), ("k:1", 1 << 40 | 2)]
        );
        assert_eq!(events[1].event, note(1 << 40 | 1));
        assert_eq!(s.put_request(&job("d", 8)).await.unwrap(), 6);
        s.delete_request(3).await.unwrap();
        s.delete_events_through("k:1".into(), 1 << 40 | 1)
            .await
            .unwrap();
        drop(s);
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let old: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN ('requests', 'events')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0, "the old tables are dropped");
        let mut left: Vec<String> = journal_rows(dir.path()).concat();
        left.sort();
        assert_eq!(left, vec!["E/9", "Ek:1/2", "R5", "R6"]);
    }

    /// A job that fails after putting journal records takes them with it; the batch's
    /// other jobs keep theirs.
    #[tokio::test]
    async fn a_failed_job_takes_its_journal_records_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        migrate(&conn).unwrap();
        let db = Db::new(&conn, passed(dir.path())).unwrap();
        let journal_job = |id: &'static str, fail: bool| {
            let (tx, rx) = oneshot::channel();
            let f = move |db: &Db<'_>| -> Result<u64, StoreError> {
                let row = db
                    .journal
                    .borrow_mut()
                    .put_request(&db.journal_sql, record_json::request(&job(id, 1)))?;
                db.journal
                    .borrow_mut()
                    .put_event(id.into(), row, record_json::event(&note(row)));
                if fail {
                    db.execute("INSERT INTO no_such_table VALUES (1)", [])?;
                }
                Ok(row)
            };
            let job: Box<dyn Job> = Box::new(FnJob {
                f,
                result: None,
                tx,
            });
            (job, rx)
        };
        let (a, ra) = journal_job("a", false);
        let (x, rx) = journal_job("x", true);
        let (b, rb) = journal_job("b", false);
        run_batch(&db, vec![a, x, b], &HealthState::default());
        let (ra, rb) = (ra.await.unwrap().unwrap(), rb.await.unwrap().unwrap());
        assert!(rx.await.unwrap().is_err());
        let mut left = journal_rows(dir.path()).concat();
        left.sort();
        let mut want = vec![
            format!("R{ra}"),
            format!("R{rb}"),
            format!("Ea/{ra}"),
            format!("Eb/{rb}"),
        ];
        want.sort();
        assert_eq!(left, want);
        // The index follows what committed: deleting the survivors empties the table.
        let (tx, done) = oneshot::channel();
        let f = move |db: &Db<'_>| -> Result<(), StoreError> {
            let mut j = db.journal.borrow_mut();
            j.delete_request(ra);
            j.delete_request(rb);
            j.delete_key("a".into());
            j.delete_events_through("b".into(), rb);
            Ok(())
        };
        run_batch(
            &db,
            vec![Box::new(FnJob {
                f,
                result: None,
                tx,
            })],
            &HealthState::default(),
        );
        done.await.unwrap().unwrap();
        assert_eq!(journal_rows(dir.path()), Vec::<Vec<String>>::new());
    }

    /// A job of `f` on the journal, for [`run_batch`].
    fn journal_job<T: Send + 'static>(
        f: impl FnMut(&Db<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> (Box<dyn Job>, oneshot::Receiver<Result<T, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (
            Box::new(FnJob {
                f,
                result: None,
                tx,
            }),
            rx,
        )
    }

    /// The ids of the stored requests, in their order.
    async fn request_ids(s: &SqliteStore) -> Vec<String> {
        s.load_requests()
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect()
    }

    /// A job putting event `n` of `key` (numbered `n`).
    fn put_job(
        key: &'static str,
        n: u64,
    ) -> (Box<dyn Job>, oneshot::Receiver<Result<(), StoreError>>) {
        journal_job(move |db| {
            db.journal
                .borrow_mut()
                .put_event(key.into(), n, record_json::event(&note(n)));
            Ok(())
        })
    }

    /// Events put and deleted before the batch's end are never written, by key or by
    /// number; a load inside a batch writes what came before it, and a later job's
    /// failure takes that write back without losing it (the batch runs again).
    #[tokio::test]
    async fn a_batch_deletes_its_own_puts_and_a_load_inside_it_survives_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        migrate(&conn).unwrap();
        let db = Db::new(&conn, passed(dir.path())).unwrap();
        let (gone, r_gone) = journal_job(|db| {
            let mut j = db.journal.borrow_mut();
            for n in 1..=3 {
                j.put_event("a".into(), n, record_json::event(&note(n)));
                j.put_event("b".into(), n, record_json::event(&note(n)));
            }
            j.delete_events_through("a".into(), 2);
            j.delete_key("b".into());
            Ok(())
        });
        run_batch(&db, vec![gone], &HealthState::default());
        r_gone.await.unwrap().unwrap();
        assert_eq!(journal_rows(dir.path()), vec![vec!["Ea/3".to_string()]]);

        // Job 1 puts, job 2 loads (writing job 1's record), job 3 fails: the batch is
        // rolled back and runs again job by job; job 1's record and the load's answer
        // are as if nothing failed.
        let (put, r_put) = put_job("a", 4);
        let (load, r_load) = journal_job(|db| {
            let mut out = Vec::new();
            db.journal
                .borrow_mut()
                .read_key(&db.journal_sql, "a", |r| out.extend(record_event(&r)))?;
            Ok(out.iter().map(|e| e.seq).collect::<Vec<_>>())
        });
        let (fail, r_fail) = journal_job(|db| {
            db.journal
                .borrow_mut()
                .put_event("a".into(), 5, record_json::event(&note(5)));
            db.execute("INSERT INTO no_such_table VALUES (1)", [])?;
            Ok(())
        });
        run_batch(&db, vec![put, load, fail], &HealthState::default());
        r_put.await.unwrap().unwrap();
        assert_eq!(r_load.await.unwrap().unwrap(), vec![3, 4]);
        assert!(r_fail.await.unwrap().is_err());
        let mut left = journal_rows(dir.path()).concat();
        left.sort();
        assert_eq!(left, vec!["Ea/3", "Ea/4"]);
        // The index matches: deleting through 4 empties the table.
        let (del, r_del) = journal_job(|db| {
            db.journal.borrow_mut().delete_events_through("a".into(), 4);
            Ok(())
        });
        run_batch(&db, vec![del], &HealthState::default());
        r_del.await.unwrap().unwrap();
        assert_eq!(journal_rows(dir.path()), Vec::<Vec<String>>::new());
    }

    /// When the journal's write fails (as on a full disk), the batch runs again job by
    /// job: the jobs whose records could not be written fail alone, the others commit,
    /// and the index follows what committed.
    #[tokio::test]
    async fn a_journal_write_that_fails_fails_its_own_jobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        migrate(&conn).unwrap();
        let db = Db::new(&conn, passed(dir.path())).unwrap();
        let (kept, r_kept) = put_job("a", 1);
        run_batch(&db, vec![kept], &HealthState::default());
        r_kept.await.unwrap().unwrap();
        conn.execute_batch(
            "CREATE TEMP TRIGGER full BEFORE INSERT ON journal
             BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
        )
        .unwrap();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (reg, r_reg) = counted_insert("r", false, Arc::clone(&count));
        let (put, r_put) = put_job("a", 2);
        let (del, r_del) = journal_job(|db| {
            db.journal.borrow_mut().delete_events_through("a".into(), 1);
            Ok(())
        });
        run_batch(&db, vec![reg, put, del], &HealthState::default());
        r_reg.await.unwrap().unwrap();
        let e = r_put.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        r_del.await.unwrap().unwrap();
        assert_eq!(registration_ids(&conn), vec!["r"]);
        assert_eq!(
            journal_rows(dir.path()),
            Vec::<Vec<String>>::new(),
            "the delete committed"
        );
        conn.execute_batch("DROP TRIGGER full").unwrap();
        let (again, r_again) = put_job("a", 3);
        run_batch(&db, vec![again], &HealthState::default());
        r_again.await.unwrap().unwrap();
        assert_eq!(journal_rows(dir.path()), vec![vec!["Ea/3".to_string()]]);
    }

    /// A record as large as a row's budget gets a row of its own; a row that left the
    /// cache is read back from the file to be written again.
    #[tokio::test]
    async fn large_records_and_rows_out_of_the_cache_are_written_again_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let small = s
            .submit(|db| {
                let mut j = db.journal.borrow_mut();
                let a = j.put_request(&db.journal_sql, record_json::request(&job("a", 1)))?;
                let b = j.put_request(&db.journal_sql, record_json::request(&job("b", 1)))?;
                Ok((a, b))
            })
            .await
            .unwrap();
        // More than the cache holds, in rows of one large request each.
        let large = journal::CACHE_BYTES / journal::MAX_ROW_BYTES + 8;
        s.submit(move |db| {
            let mut j = db.journal.borrow_mut();
            for n in 0..large {
                let mut big = job(&format!("big{n}"), 2);
                big.payload = "x".repeat(journal::MAX_ROW_BYTES);
                j.put_request(&db.journal_sql, record_json::request(&big))?;
            }
            Ok(())
        })
        .await
        .unwrap();
        let rows = journal_rows(dir.path());
        assert_eq!(rows.len(), 1 + large);
        assert!(
            rows[1..].iter().all(|r| r.len() == 1),
            "one large record a row"
        );
        // The first row is long out of the cache: its rewrite reads it from the file.
        s.delete_request(small.0).await.unwrap();
        assert_eq!(journal_rows(dir.path())[0], vec![format!("R{}", small.1)]);
        drop(s);
        let s = SqliteStore::open(dir.path()).unwrap();
        let ids = request_ids(&s).await;
        assert_eq!(ids.len(), 1 + large);
        assert_eq!(ids[0], "b");
    }

    #[tokio::test]
    async fn schema_4_requests_keyed_by_id_migrate_in_their_stored_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = at_schema(dir.path(), 4);
            for id in ["c", "a", "b"] {
                conn.execute(
                    "INSERT INTO requests (id, data) VALUES (?1, ?2)",
                    params![id, to_json(&job(id, 7)).unwrap()],
                )
                .unwrap();
            }
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        let ids = request_ids(&s).await;
        assert_eq!(ids, vec!["c", "a", "b"]);
    }

    /// Another connection's commit (as `connectord plugin-call` makes from its own
    /// process) moves the counter; the store's own writes do not.
    #[tokio::test]
    async fn writes_by_another_connection_are_seen_and_own_writes_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let mut ext = s.external_changes().unwrap();
        let wait = EXTERNAL_CHECK * 3;
        s.plugin_state_put("p".into(), "own".into(), b"1".to_vec())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(wait, ext.changed()).await.is_err(),
            "its own write is not another process's"
        );
        let other = SqliteStore::open(dir.path()).unwrap();
        other
            .plugin_state_put("p".into(), "theirs".into(), b"2".to_vec())
            .await
            .unwrap();
        tokio::time::timeout(wait, ext.changed())
            .await
            .expect("another connection's write is seen")
            .unwrap();
        assert_eq!(*ext.borrow_and_update(), 1);
    }

    fn hc(domain: &str, hour: u64, count: u64) -> HourCount {
        HourCount {
            domain: domain.into(),
            hour,
            count,
        }
    }

    #[tokio::test]
    async fn hour_counts_are_replaced_by_domain_and_hour_and_old_hours_go() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SqliteStore::open(dir.path()).unwrap();
            s.save_hour_counts(vec![hc("a", 100, 5), hc("a", 101, 1), hc("b", 101, 2)], 90)
                .await
                .unwrap();
            // a's hour 101 counted on; hour 100 leaves the window.
            s.save_hour_counts(vec![hc("a", 101, 4)], 101)
                .await
                .unwrap();
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        let mut got = s.load_hour_counts().await.unwrap();
        got.sort_by(|x, y| (&x.domain, x.hour).cmp(&(&y.domain, y.hour)));
        assert_eq!(got, vec![hc("a", 101, 4), hc("b", 101, 2)]);
        s.submit(|conn| {
            conn.execute(
                "INSERT INTO limit_counts (domain, hour, count) VALUES ('c', 101, -3)",
                [],
            )?;
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(
            s.load_hour_counts().await.unwrap().len(),
            2,
            "a negative count is skipped, not loaded"
        );
    }

    #[test]
    fn schema_5_migrates_to_limit_counts_and_keeps_its_tables() {
        let dir = tempfile::tempdir().unwrap();
        let conn = at_schema(dir.path(), 5);
        migrate(&conn).unwrap();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert!(tables.contains(&"limit_counts".to_string()), "{tables:?}");
        assert!(tables.contains(&"access_keys".to_string()), "{tables:?}");
    }

    /// Schema 6 stored a device's address and our socket's as `peer` and `local`; they
    /// become one peer reference, the rest of the row as it was. A row of another shape
    /// (not JSON, or already migrated) is left alone.
    #[tokio::test]
    async fn schema_6_registrations_migrate_to_peer_refs() {
        let dir = tempfile::tempdir().unwrap();
        // As release 0.1.0 wrote it (serde of the registration with two socket addresses).
        let old = r#"{"id":"r1","domain":"default","name":"n","ept":null,"lifetime_s":60,"binding":"U","lwm2m":"1.1","queue":false,"peer":"[2001:db8::7]:56830","local":"[::]:5683","links":"</3/0>","registered_at_ms":1,"expires_at_ms":2}"#;
        {
            let conn = at_schema(dir.path(), 6);
            conn.execute(
                "INSERT INTO registrations (id, domain, name, data) VALUES ('r1', 'default', 'n', ?1)",
                params![old],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO registrations (id, domain, name, data) VALUES ('x', 'd', 'x', 'not json')",
                [],
            )
            .unwrap();
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        let regs = s.load_registrations().await.unwrap();
        assert_eq!(regs.len(), 1, "the row that is not JSON is still skipped");
        let mut want = reg("r1", "n");
        want.lwm2m = Some("1.1".into());
        want.peer = connectord_model::PeerRef::udp(
            "[::]:5683".parse().unwrap(),
            "[2001:db8::7]:56830".parse().unwrap(),
        );
        assert_eq!(regs[0], want);
        // Written back in the new form, it loads the same.
        s.put_registration(regs[0].clone()).await.unwrap();
        assert_eq!(s.load_registrations().await.unwrap(), vec![want]);
    }

    /// Schema 7 stored each event as its rendered mbed JSON entry inside a serde record;
    /// schema 8 turns each kind into the store's typed record, and numbers keys on after
    /// their highest stored event. Rows of another shape are left alone (and skipped).
    #[tokio::test]
    async fn schema_7_events_of_every_kind_migrate_to_typed_records() {
        use connectord_model::{
            AsyncResponse, EndpointSummary, Entry, Notification, SubscriptionError,
        };
        let dir = tempfile::tempdir().unwrap();
        // As the release before wrote them (`record_json::event` of a `Body` entry).
        let old = [
            r#"{"key_id":"k","seq":3,"event":{"kind":"notifications","body":{"ct":"text/plain","ep":"e","max-age":60,"path":"/3303/0/5700","payload":"MjEuNw=="},"created_ms":11}}"#,
            r#"{"key_id":"k","seq":4,"event":{"kind":"registrations","body":{"ct":"application/vnd.oma.lwm2m+tlv","ep":"e","ept":"Sensor","lwm2m":"1.1","q":true,"resources":[{"ct":"text/plain","if":"sensor","obs":true,"path":"/3/0","rf":"oma.lwm2m","rt":"oma.lwm2m","ver":"1.1"},{"obs":false,"path":"/1/0"}]},"created_ms":12}}"#,
            r#"{"key_id":"k","seq":5,"event":{"kind":"reg-updates","body":{"ep":"e","ept":"","q":false,"resources":[]},"created_ms":13}}"#,
            r#"{"key_id":"k","seq":6,"event":{"kind":"de-registrations","body":"e","created_ms":14}}"#,
            r#"{"key_id":"k","seq":7,"event":{"kind":"registrations-expired","body":"e\"q","created_ms":15}}"#,
            r#"{"key_id":"k","seq":8,"event":{"kind":"async-responses","body":{"ct":"text/plain","id":"1#a","max-age":0,"payload":"MTI=","status":200},"created_ms":16}}"#,
            r#"{"key_id":"k","seq":9,"event":{"kind":"async-responses","body":{"error":"timeout","id":"2#b","location":"/3303/1","payload":"","status":504},"created_ms":17}}"#,
            r#"{"key_id":"j","seq":2,"event":{"kind":"subscription-errors","body":{"ep":"e","error":"no Observe","path":"/3/0/1","status":412},"created_ms":18}}"#,
        ];
        {
            let conn = at_schema(dir.path(), 7);
            for row in old {
                let v: serde_json::Value = serde_json::from_str(row).unwrap();
                conn.execute(
                    "INSERT INTO events (key_id, seq, data) VALUES (?1, ?2, ?3)",
                    params![
                        v["key_id"].as_str().unwrap(),
                        v["seq"].as_i64().unwrap(),
                        row
                    ],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO events (key_id, seq, data) VALUES ('x', 1, 'not json')",
                [],
            )
            .unwrap();
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        let loaded = s.load_events().await.unwrap();
        let got: Vec<(&str, u64, &Entry, u64)> = loaded
            .iter()
            .map(|e| {
                (
                    e.key_id.as_str(),
                    e.seq,
                    e.event.entry(),
                    e.event.created_ms,
                )
            })
            .collect();
        let summary = connectord_model::testing::endpoint_summary();
        let want = [
            (
                "j",
                2,
                Entry::SubscriptionError(SubscriptionError {
                    ep: "e".into(),
                    path: "/3/0/1".into(),
                    status: 412,
                    error: "no Observe".into(),
                }),
                18,
            ),
            (
                "k",
                3,
                Entry::Notification(Notification {
                    ep: "e".into(),
                    path: "/3303/0/5700".into(),
                    ct: Some("text/plain".into()),
                    payload: b"21.7".to_vec(),
                    max_age: 60,
                }),
                11,
            ),
            ("k", 4, Entry::Registration(summary), 12),
            (
                "k",
                5,
                Entry::RegUpdate(EndpointSummary {
                    ep: "e".into(),
                    ept: String::new(),
                    queue: false,
                    resources: vec![],
                    lwm2m: None,
                    ct: None,
                }),
                13,
            ),
            ("k", 6, Entry::DeRegistration("e".into()), 14),
            ("k", 7, Entry::Expired("e\"q".into()), 15),
            (
                "k",
                8,
                Entry::AsyncResponse(AsyncResponse {
                    id: "1#a".into(),
                    status: 200,
                    payload: b"12".to_vec(),
                    ct: Some("text/plain".into()),
                    max_age: Some(0),
                    error: None,
                    location: None,
                }),
                16,
            ),
            (
                "k",
                9,
                Entry::AsyncResponse(AsyncResponse {
                    id: "2#b".into(),
                    status: 504,
                    payload: vec![],
                    ct: None,
                    max_age: None,
                    error: Some("timeout".into()),
                    location: Some("/3303/1".into()),
                }),
                17,
            ),
        ];
        let want: Vec<(&str, u64, &Entry, u64)> =
            want.iter().map(|(k, s, e, t)| (*k, *s, e, *t)).collect();
        assert_eq!(got, want, "the row that is not JSON is still skipped");
        // Each key is numbered on after its highest stored event.
        let a = s.append_events(
            vec![
                ("k".into(), loaded[1].event.clone()),
                ("j".into(), loaded[0].event.clone()),
                ("x".into(), loaded[0].event.clone()),
            ],
            None,
        );
        assert!(
            a.seqs[0] > 9 && a.seqs[1] > 2 && a.seqs[2] > 1,
            "{:?}",
            a.seqs
        );
        a.durable.await.unwrap();
    }

    /// A job that counts its runs and inserts the registration row `id`, then fails if
    /// `fail` (after its insert, so that the insert must be undone).
    fn counted_insert(
        id: &'static str,
        fail: bool,
        runs: Arc<std::sync::atomic::AtomicUsize>,
    ) -> (Box<dyn Job>, oneshot::Receiver<Result<(), StoreError>>) {
        let (tx, rx) = oneshot::channel();
        let f = move |conn: &Db<'_>| {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            conn.execute(
                "INSERT INTO registrations (id, domain, name, data) VALUES (?1, 'd', ?1, '{}')",
                params![id],
            )?;
            if fail {
                conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
            }
            Ok(())
        };
        let job = FnJob {
            f,
            result: None,
            tx,
        };
        (Box::new(job), rx)
    }

    fn registration_ids(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT id FROM registrations ORDER BY id")
            .unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    /// What the store thread of a database whose check has passed starts with.
    fn passed(dir: &Path) -> Start {
        Start {
            gate: Gate::Passed,
            path: dir.join(DB_FILE),
        }
    }

    /// A job whose answer nobody awaits.
    fn unawaited<T: Send + 'static>(
        f: impl FnMut(&Db<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Box<dyn Job> {
        let (tx, _rx) = oneshot::channel();
        Box::new(FnJob {
            f,
            result: None,
            tx,
        })
    }

    /// The store is failing from the first write the storage refuses until a batch that
    /// writes commits: a batch of reads (which commits on a full disk too) proves nothing,
    /// and an error of the statement rather than the storage does not count.
    #[test]
    fn health_fails_with_the_storage_and_recovers_with_a_committed_write() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        migrate(&conn).unwrap();
        let db = Db::new(&conn, passed(dir.path())).unwrap();
        let h = HealthState::default();
        let failing = |h: &HealthState| h.snapshot().failing.is_some();

        run_batch(
            &db,
            vec![unawaited(|_| {
                Err::<(), _>(StoreError::Commit("disk full".into()))
            })],
            &h,
        );
        assert!(failing(&h));
        assert_eq!(h.snapshot().errors, 1);
        let read = |c: &Db<'_>| {
            Ok(c.query_row("SELECT count(*) FROM registrations", [], |r| {
                r.get::<_, i64>(0)
            })?)
        };
        run_batch(&db, vec![unawaited(read)], &h);
        assert!(
            failing(&h),
            "a read-only batch does not make the store healthy"
        );
        let bad_statement = |c: &Db<'_>| {
            c.execute("INSERT INTO no_such_table VALUES (1)", [])?;
            Ok(())
        };
        run_batch(&db, vec![unawaited(bad_statement)], &h);
        assert_eq!(h.snapshot().errors, 1, "not a storage failure");
        let write = |c: &Db<'_>| {
            c.execute(
                "INSERT INTO registrations (id, domain, name, data) VALUES ('h', 'd', 'h', '{}')",
                [],
            )?;
            Ok(())
        };
        run_batch(&db, vec![unawaited(write)], &h);
        assert_eq!(
            h.snapshot(),
            Health {
                failing: None,
                errors: 1
            }
        );
    }

    #[tokio::test]
    async fn a_batch_runs_each_job_once_and_a_failed_job_reruns_it_with_savepoints() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        migrate(&conn).unwrap();
        let db = Db::new(&conn, passed(dir.path())).unwrap();

        let counts: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
        let (a, ra) = counted_insert("a", false, Arc::clone(&counts[0]));
        let (b, rb) = counted_insert("b", false, Arc::clone(&counts[1]));
        run_batch(&db, vec![a, b], &HealthState::default());
        ra.await.unwrap().unwrap();
        rb.await.unwrap().unwrap();
        assert_eq!(counts[0].load(Ordering::SeqCst), 1, "no failure: one run");
        assert_eq!(registration_ids(&conn), vec!["a", "b"]);

        let counts: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
        let (c, rc) = counted_insert("c", false, Arc::clone(&counts[0]));
        let (x, rx) = counted_insert("x", true, Arc::clone(&counts[1]));
        let (d, rd) = counted_insert("d", false, Arc::clone(&counts[2]));
        run_batch(&db, vec![c, x, d], &HealthState::default());
        rc.await.unwrap().unwrap();
        assert!(
            rx.await.unwrap().is_err(),
            "the failing job reports its error"
        );
        rd.await.unwrap().unwrap();
        assert_eq!(
            counts
                .iter()
                .map(|c| c.load(Ordering::SeqCst))
                .collect::<Vec<_>>(),
            vec![2, 2, 1],
            "the batch ran up to the failure, then again with savepoints"
        );
        assert_eq!(
            registration_ids(&conn),
            vec!["a", "b", "c", "d"],
            "the failed job's own insert was undone, the others committed"
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        match SqliteStore::open(dir.path()) {
            Err(StoreError::SchemaTooNew { found: 99, .. }) => {}
            other => panic!("expected SchemaTooNew, got {:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn unreadable_registration_rows_are_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        s.put_registration(reg("a", "n1")).await.unwrap();
        s.submit(|conn| {
            conn.execute("INSERT INTO registrations (id, domain, name, data) VALUES ('x', 'd', 'n', 'not json')", [])?;
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(s.load_registrations().await.unwrap().len(), 1);
    }

    #[test]
    fn an_unwritable_state_dir_is_a_clear_error() {
        let err = SqliteStore::open(Path::new("/proc/connectord-cannot-be-here"))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("/proc/connectord-cannot-be-here"),
            "{err}"
        );
    }
}
