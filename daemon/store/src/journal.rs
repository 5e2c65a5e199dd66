//! The SQLite store's journal of requests to devices and undelivered events (issue 24).
//!
//! Every proxied read stored a request row, then an event row with the request's delete,
//! then the event's delete: four statements, each a B-tree insert or delete, and about 14
//! WAL frames per commit; 24 000 of a read's 70 000 instructions were the store's
//! (docs/PERFORMANCE.md). Here the records a batch transaction puts go into one row of the
//! `journal` table, a few rows at most ([`MAX_ROW_RECORDS`], [`MAX_ROW_BYTES`]), one kind
//! of record a row (requests, events); which record lives in which row is kept in memory
//! (the index). A delete is made at the end of the batch: a row left with nothing live is
//! deleted, one left with some is written again with those only, so the table holds
//! exactly the live records and a load needs nothing but the rows. A record put and
//! deleted before the batch's changes are written (at its end, or earlier when a job of
//! the batch loads: [`Journal::read`]) is never written.
//!
//! The index mirrors the database inside the open transaction: it is changed as the batch
//! writes, and forgotten ([`Journal::forget`]) whenever the transaction, or a job's
//! savepoint, is rolled back; it is read again from the rows the next time it is needed.
//! No other process writes the journal (`connectord plugin-call` writes plugin state
//! only); the store thread forgets the index all the same when its once-a-second check
//! sees another process's commit. The daemon's own state is changed by the callers
//! after the commit, as before.
//!
//! A record is text with lengths, so that the migration from the tables of one row per
//! record (schema 10) can write it in SQL:
//! - a request: `R<row>:<n>:<json>`, where `<row>` is its row number ([`Job::row`]) and
//!   `<n>` the byte length of `<json>`;
//! - an event: `E<seq>:<k>:<key id><n>:<json>`, `<k>` the byte length of the key id.
//!
//! The JSON is the record of [`record_json`](crate::record_json), as the tables held it.
//!
//! [`Job::row`]: connectord_model::Job::row

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{Connection, Statement, params};
use rustc_hash::FxHashMap as HashMap;

use crate::StoreError;

/// Most records in one journal row.
pub(crate) const MAX_ROW_RECORDS: usize = 64;
/// The size from which a journal row takes no more records (so a row may pass it by its
/// last record): a row whose records are deleted a few at a time is written again that
/// many times, so rows stay small.
pub(crate) const MAX_ROW_BYTES: usize = 16 * 1024;

/// How many bytes of the rows written last are kept in memory ([`Index::cached`]), so that
/// writing one again after some of its records were deleted needs no read and no parse
/// of it: requests are answered, and events delivered, a few batches after they were put.
pub(crate) const CACHE_BYTES: usize = 4 << 20;

/// The kind of a journal row's records (the `kind` column).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Request = 0,
    Event = 1,
}

/// A record's identity.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Ident<'a> {
    /// A request by row number.
    Request(u64),
    /// An event by key id and sequence number.
    Event(&'a str, u64),
}

/// One record of a journal row: who it is, its JSON (its bytes, checked as UTF-8 only by
/// the loads that parse it), and where the whole record lies in the row (to copy it as it
/// is).
pub(crate) struct Record<'a> {
    pub ident: Ident<'a>,
    pub json: &'a [u8],
    pub span: std::ops::Range<usize>,
}

/// Appends a request's record. (`itoa`, not `write!`: the formatting machinery was 2 % of
/// a proxied read's instructions.)
pub(crate) fn encode_request(out: &mut Vec<u8>, row: u64, json: &str) {
    out.push(b'R');
    number(out, row);
    number(out, json.len() as u64);
    out.extend_from_slice(json.as_bytes());
}

/// Appends an event's record.
pub(crate) fn encode_event(out: &mut Vec<u8>, key_id: &str, seq: u64, json: &str) {
    out.push(b'E');
    number(out, seq);
    number(out, key_id.len() as u64);
    out.extend_from_slice(key_id.as_bytes());
    number(out, json.len() as u64);
    out.extend_from_slice(json.as_bytes());
}

/// A number and its `:`.
fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.push(b':');
}

/// The records of a journal row, in order; the error says where the row stops making
/// sense (the records before it are given).
pub(crate) fn decode(data: &[u8]) -> (Vec<Record<'_>>, Option<String>) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        match decode_one(data, at) {
            Ok(r) => {
                at = r.span.end;
                out.push(r);
            }
            Err(e) => return (out, Some(format!("at byte {at}: {e}"))),
        }
    }
    (out, None)
}

fn decode_one(data: &[u8], start: usize) -> Result<Record<'_>, String> {
    let mut at = start + 1;
    // Row and sequence numbers stay within SQLite's integers, as the tables' were: a
    // larger one would make the next number wrap.
    let number = |at: &mut usize| -> Result<u64, String> {
        let digits = data[*at..]
            .iter()
            .position(|b| *b == b':')
            .ok_or("no ':' after a number")?;
        let text = std::str::from_utf8(&data[*at..*at + digits]).map_err(|e| e.to_string())?;
        let n = text
            .parse::<u64>()
            .map_err(|e| format!("number {text:?}: {e}"))?;
        *at += digits + 1;
        Ok(n)
    };
    let take = |at: &mut usize, len: u64| -> Result<&[u8], String> {
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| at.checked_add(l))
            .filter(|end| *end <= data.len())
            .ok_or("a length past the row's end")?;
        let s = &data[*at..end];
        *at = end;
        Ok(s)
    };
    let id_number = |at: &mut usize| -> Result<u64, String> {
        let n = number(at)?;
        if n > i64::MAX as u64 {
            return Err(format!("number {n} out of range"));
        }
        Ok(n)
    };
    let ident = match data[start] {
        b'R' => Ident::Request(id_number(&mut at)?),
        b'E' => {
            let seq = id_number(&mut at)?;
            let klen = number(&mut at)?;
            let key = take(&mut at, klen)?;
            Ident::Event(std::str::from_utf8(key).map_err(|e| e.to_string())?, seq)
        }
        other => return Err(format!("unknown record tag {other:#04x}")),
    };
    let n = number(&mut at)?;
    let json = take(&mut at, n)?;
    Ok(Record {
        ident,
        json,
        span: start..at,
    })
}

/// A row's data, as a blob (or text, as the migration's SQL may leave it).
fn bytes(v: rusqlite::types::ValueRef<'_>) -> Result<&[u8], rusqlite::Error> {
    v.as_bytes()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, v.data_type(), Box::new(e)))
}

/// The connection and the statements of every flush, prepared for the store thread's life
/// (through rusqlite's statement cache each use hashes the SQL text: about 1 000
/// instructions a statement, most of a notification's journal work).
pub(crate) struct Sql<'c> {
    pub conn: &'c Connection,
    insert: RefCell<Statement<'c>>,
    update: RefCell<Statement<'c>>,
    delete: RefCell<Statement<'c>>,
    select: RefCell<Statement<'c>>,
}

impl<'c> Sql<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Result<Sql<'c>, StoreError> {
        let prepare = |sql| conn.prepare(sql).map(RefCell::new);
        Ok(Sql {
            conn,
            insert: prepare("INSERT INTO journal (id, kind, data) VALUES (?1, ?2, ?3)")?,
            update: prepare("UPDATE journal SET data = ?2 WHERE id = ?1")?,
            delete: prepare("DELETE FROM journal WHERE id = ?1")?,
            select: prepare("SELECT data FROM journal WHERE id = ?1")?,
        })
    }
}

/// A change a job asked for, made at the end of the batch ([`Journal::flush`]).
enum Op {
    PutRequest {
        row: u64,
        json: String,
    },
    PutEvent {
        key_id: String,
        seq: u64,
        json: String,
    },
    DeleteRequest(u64),
    DeleteEventsThrough(String, u64),
    DeleteKey(String),
}

/// Which journal row holds each live record, and how many each row holds. Decision: Fx
/// hashing (`rustc-hash`), not SipHash: the keys are row numbers and the daemon's own key
/// ids, and SipHash was 4 % of a proxied read's instructions here (callgrind).
#[derive(Default)]
struct Index {
    /// Rows read, per kind ([`Journal::read`]).
    requests_read: bool,
    events_read: bool,
    /// The next journal row's id.
    next_id: Option<i64>,
    /// The next request's row number.
    next_request: u64,
    rows: HashMap<i64, Row>,
    requests: HashMap<u64, i64>,
    events: HashMap<String, BTreeMap<u64, i64>>,
    /// The data of the rows written last, by id, at most [`CACHE_BYTES`] together (the
    /// oldest rows leave first).
    cached: BTreeMap<i64, Vec<u8>>,
    cached_bytes: usize,
}

struct Row {
    kind: Kind,
    live: u32,
}

impl Index {
    fn holds(&self, ident: Ident<'_>, id: i64) -> bool {
        match ident {
            Ident::Request(r) => self.requests.get(&r) == Some(&id),
            Ident::Event(k, s) => self.events.get(k).and_then(|m| m.get(&s)) == Some(&id),
        }
    }

    /// One record fewer in row `id`, to be written again or deleted.
    fn release(&mut self, id: i64, touched: &mut BTreeSet<i64>) {
        if let Some(r) = self.rows.get_mut(&id) {
            r.live = r.live.saturating_sub(1);
        }
        touched.insert(id);
    }

    /// Takes in a row's records as read from the database.
    fn take_in(&mut self, id: i64, kind: Kind, records: &[Record<'_>]) {
        let mut live = 0;
        for r in records {
            match (kind, r.ident) {
                (Kind::Request, Ident::Request(n)) => {
                    self.requests.insert(n, id);
                    self.next_request = self.next_request.max(n.saturating_add(1));
                }
                (Kind::Event, Ident::Event(k, s)) => {
                    self.event_entry(k).insert(s, id);
                }
                _ => continue,
            }
            live += 1;
        }
        self.rows.insert(id, Row { kind, live });
    }

    /// Keeps a row's data in [`Index::cached`] (in place of what was kept for it).
    fn cache(&mut self, id: i64, data: Vec<u8>) {
        self.uncache(id);
        if data.len() > CACHE_BYTES / 4 {
            return;
        }
        self.cached_bytes += data.len();
        self.cached.insert(id, data);
        while self.cached_bytes > CACHE_BYTES {
            match self.cached.pop_first() {
                Some((_, old)) => self.cached_bytes -= old.len(),
                None => break,
            }
        }
    }

    fn uncache(&mut self, id: i64) -> Option<Vec<u8>> {
        let data = self.cached.remove(&id)?;
        self.cached_bytes -= data.len();
        Some(data)
    }

    fn event_entry(&mut self, key_id: &str) -> &mut BTreeMap<u64, i64> {
        if !self.events.contains_key(key_id) {
            self.events.insert(key_id.to_string(), BTreeMap::new());
        }
        self.events.get_mut(key_id).expect("inserted above")
    }
}

/// The journal's state on the store thread: the index and the batch's changes not yet
/// written.
#[derive(Default)]
pub(crate) struct Journal {
    index: Index,
    pending: Vec<Op>,
}

impl Journal {
    /// Forgets the index and the changes not written: the transaction they belong to was
    /// rolled back (or the file written by another process).
    pub(crate) fn forget(&mut self) {
        *self = Journal::default();
    }

    /// Stores a request: its row number, one more than any stored or given.
    pub(crate) fn put_request(&mut self, sql: &Sql<'_>, json: String) -> Result<u64, StoreError> {
        self.ensure(sql, Kind::Request)?;
        let row = self.index.next_request.max(1);
        self.index.next_request = row + 1;
        self.pending.push(Op::PutRequest { row, json });
        Ok(row)
    }

    pub(crate) fn put_event(&mut self, key_id: String, seq: u64, json: String) {
        self.pending.push(Op::PutEvent { key_id, seq, json });
    }

    pub(crate) fn delete_request(&mut self, row: u64) {
        self.pending.push(Op::DeleteRequest(row));
    }

    pub(crate) fn delete_events_through(&mut self, key_id: String, seq: u64) {
        self.pending.push(Op::DeleteEventsThrough(key_id, seq));
    }

    pub(crate) fn delete_key(&mut self, key_id: String) {
        self.pending.push(Op::DeleteKey(key_id));
    }

    /// Reads the rows of `kind` into the index if they are not in it.
    fn ensure(&mut self, sql: &Sql<'_>, kind: Kind) -> Result<(), StoreError> {
        let read = match kind {
            Kind::Request => self.index.requests_read,
            Kind::Event => self.index.events_read,
        };
        if !read {
            self.read(sql, kind, |_| {})?;
        }
        Ok(())
    }

    /// Reads every row of `kind` (the batch's changes written first), taking them into the
    /// index afresh and giving each readable record to `each`. A row that cannot be read
    /// from some byte on is logged; its records from there are not in the index, so the
    /// next write of the row (or its delete) drops them, logged again then.
    pub(crate) fn read(
        &mut self,
        sql: &Sql<'_>,
        kind: Kind,
        mut each: impl FnMut(Record<'_>),
    ) -> Result<(), StoreError> {
        self.flush(sql)?;
        let index = &mut self.index;
        index.rows.retain(|_, r| r.kind != kind);
        match kind {
            Kind::Request => index.requests.clear(),
            Kind::Event => index.events.clear(),
        }
        let mut stmt = sql
            .conn
            .prepare_cached("SELECT id, data FROM journal WHERE kind = ?1")?;
        let mut rows = stmt.query(params![kind as i64])?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let data = bytes(row.get_ref(1)?)?;
            let (records, err) = decode(data);
            if let Some(e) = err {
                tracing::error!(
                    "store: journal row {id} is unreadable {e}; its records from there are skipped, and dropped when the row is next written"
                );
            }
            index.take_in(id, kind, &records);
            records.into_iter().for_each(&mut each);
        }
        match kind {
            Kind::Request => index.requests_read = true,
            Kind::Event => index.events_read = true,
        }
        Ok(())
    }

    /// The records of one key's events, in the order of their rows (the batch's changes
    /// written first).
    pub(crate) fn read_key(
        &mut self,
        sql: &Sql<'_>,
        key_id: &str,
        mut each: impl FnMut(Record<'_>),
    ) -> Result<(), StoreError> {
        self.flush(sql)?;
        self.ensure(sql, Kind::Event)?;
        let ids: BTreeSet<i64> = match self.index.events.get(key_id) {
            Some(m) => m.values().copied().collect(),
            None => return Ok(()),
        };
        let mut stmt = sql.select.borrow_mut();
        for id in ids {
            let mut rows = stmt.query(params![id])?;
            let Some(row) = rows.next()? else { continue };
            let (records, _) = decode(bytes(row.get_ref(0)?)?);
            for r in records {
                if matches!(r.ident, Ident::Event(k, _) if k == key_id)
                    && self.index.holds(r.ident, id)
                {
                    each(r);
                }
            }
        }
        Ok(())
    }

    /// Writes the batch's changes: the records put in new rows, the rows that lost
    /// records written again or deleted.
    pub(crate) fn flush(&mut self, sql: &Sql<'_>) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut ops = std::mem::take(&mut self.pending);
        let deletes_requests = ops.iter().any(|o| matches!(o, Op::DeleteRequest(_)));
        let deletes_events = ops
            .iter()
            .any(|o| matches!(o, Op::DeleteEventsThrough(..) | Op::DeleteKey(_)));
        let written = (|| {
            if deletes_requests {
                self.ensure(sql, Kind::Request)?;
            }
            if deletes_events {
                self.ensure(sql, Kind::Event)?;
            }
            apply(&mut self.index, sql, &ops, deletes_requests, deletes_events)
        })();
        // The next batch's changes go into the same allocation.
        ops.clear();
        self.pending = ops;
        written
    }
}

/// Writes `ops` ([`Journal::flush`]); `deletes_requests`, `deletes_events`: whether any
/// of them deletes such records (if not, the puts need no lookup by identity: a batch of
/// notifications alone).
fn apply(
    index: &mut Index,
    sql: &Sql<'_>,
    ops: &[Op],
    deletes_requests: bool,
    deletes_events: bool,
) -> Result<(), StoreError> {
    // Which ops are puts still to write (not deleted in this same batch).
    let mut alive = vec![false; ops.len()];
    let mut put_requests: HashMap<u64, usize> = HashMap::default();
    let mut put_events: HashMap<&str, Vec<(u64, usize)>> = HashMap::default();
    let mut touched = BTreeSet::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::PutRequest { row, .. } => {
                if deletes_requests {
                    put_requests.insert(*row, i);
                }
                alive[i] = true;
            }
            Op::PutEvent { key_id, seq, .. } => {
                if deletes_events {
                    put_events.entry(key_id).or_default().push((*seq, i));
                }
                alive[i] = true;
            }
            Op::DeleteRequest(row) => {
                if let Some(j) = put_requests.remove(row) {
                    alive[j] = false;
                } else if let Some(id) = index.requests.remove(row) {
                    index.release(id, &mut touched);
                }
            }
            Op::DeleteEventsThrough(key_id, through) => {
                if let Some(v) = put_events.get_mut(key_id.as_str()) {
                    v.retain(|(seq, j)| {
                        let gone = seq <= through;
                        if gone {
                            alive[*j] = false;
                        }
                        !gone
                    });
                }
                // A key's map stays when emptied: its next events need no new one.
                if let Some(m) = index.events.get_mut(key_id.as_str()) {
                    let kept = match through.checked_add(1) {
                        Some(above) => m.split_off(&above),
                        None => BTreeMap::new(),
                    };
                    for id in std::mem::replace(m, kept).into_values() {
                        index.release(id, &mut touched);
                    }
                }
            }
            Op::DeleteKey(key_id) => {
                for (_, j) in put_events.remove(key_id.as_str()).unwrap_or_default() {
                    alive[j] = false;
                }
                for id in index
                    .events
                    .remove(key_id.as_str())
                    .unwrap_or_default()
                    .into_values()
                {
                    index.release(id, &mut touched);
                }
            }
        }
    }
    let next_id = match index.next_id {
        Some(n) => n,
        None => sql
            .conn
            .prepare_cached("SELECT coalesce(max(id), 0) + 1 FROM journal")?
            .query_row([], |r| r.get(0))?,
    };
    let mut writer = Writer {
        sql,
        next_id,
        data: Vec::new(),
        idents: Vec::new(),
    };
    for kind in [Kind::Request, Kind::Event] {
        for (op, _) in ops.iter().zip(&alive).filter(|(_, alive)| **alive) {
            match (kind, op) {
                (Kind::Request, Op::PutRequest { row, json }) => {
                    encode_request(&mut writer.data, *row, json);
                    writer.idents.push(("", *row));
                }
                (Kind::Event, Op::PutEvent { key_id, seq, json }) => {
                    encode_event(&mut writer.data, key_id, *seq, json);
                    writer.idents.push((key_id, *seq));
                }
                _ => continue,
            }
            if writer.idents.len() >= MAX_ROW_RECORDS || writer.data.len() >= MAX_ROW_BYTES {
                writer.write(kind, index, &mut touched)?;
            }
        }
        writer.write(kind, index, &mut touched)?;
    }
    index.next_id = Some(writer.next_id);
    for id in touched {
        let live = index.rows.get(&id).map_or(0, |r| r.live);
        if live == 0 {
            sql.delete.borrow_mut().execute(params![id])?;
            index.rows.remove(&id);
            index.uncache(id);
            continue;
        }
        let data = match index.uncache(id) {
            Some(data) => data,
            None => sql
                .select
                .borrow_mut()
                .query_row(params![id], |r| Ok(bytes(r.get_ref(0)?)?.to_vec()))?,
        };
        let (records, damage) = decode(&data);
        if let Some(e) = damage {
            tracing::warn!(
                "store: journal row {id} is written again without its unreadable part ({e})"
            );
        }
        let mut kept = Vec::with_capacity(data.len());
        for r in records {
            if index.holds(r.ident, id) {
                kept.extend_from_slice(&data[r.span]);
            }
        }
        sql.update.borrow_mut().execute(params![id, kept])?;
        index.cache(id, kept);
    }
    Ok(())
}

/// The journal row being filled by [`Journal::flush`].
struct Writer<'s, 'c, 'o> {
    sql: &'s Sql<'c>,
    next_id: i64,
    data: Vec<u8>,
    /// The records in `data`: (key id, sequence number) of events; ("", row) of requests.
    idents: Vec<(&'o str, u64)>,
}

impl Writer<'_, '_, '_> {
    /// Inserts the row filled so far (if any) and takes its records into the index.
    fn write(
        &mut self,
        kind: Kind,
        index: &mut Index,
        touched: &mut BTreeSet<i64>,
    ) -> Result<(), StoreError> {
        if self.idents.is_empty() {
            return Ok(());
        }
        let id = self.next_id;
        self.sql
            .insert
            .borrow_mut()
            .execute(params![id, kind as i64, self.data])?;
        self.next_id += 1;
        index.rows.insert(
            id,
            Row {
                kind,
                live: self.idents.len() as u32,
            },
        );
        index.cache(id, std::mem::take(&mut self.data));
        for (key_id, n) in self.idents.drain(..) {
            let before = match kind {
                Kind::Request => index.requests.insert(n, id),
                Kind::Event => index.event_entry(key_id).insert(n, id),
            };
            if let Some(old) = before {
                index.release(old, touched);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_as_written_whatever_their_bytes() {
        let mut data = Vec::new();
        encode_request(&mut data, 7, r#"{"id":"a:b"}"#);
        encode_event(&mut data, "k:9", 1 << 40 | 3, "{\"ep\":\"é\"}");
        encode_event(&mut data, "", 0, "");
        let (records, err) = decode(&data);
        assert_eq!(err, None);
        let got: Vec<_> = records.iter().map(|r| (r.ident, r.json)).collect();
        assert_eq!(
            got,
            vec![
                (Ident::Request(7), br#"{"id":"a:b"}"#.as_slice()),
                (
                    Ident::Event("k:9", 1 << 40 | 3),
                    "{\"ep\":\"é\"}".as_bytes()
                ),
                (Ident::Event("", 0), b"".as_slice()),
            ]
        );
        assert_eq!(records[2].span.end, data.len());
    }

    #[test]
    fn the_row_cache_keeps_the_newest_rows_within_its_bytes() {
        let mut index = Index::default();
        let quarter = CACHE_BYTES / 4;
        for id in 1..=5 {
            index.cache(id, vec![0; quarter]);
        }
        assert_eq!(
            index.cached.keys().copied().collect::<Vec<_>>(),
            vec![2, 3, 4, 5]
        );
        assert_eq!(index.cached_bytes, CACHE_BYTES);
        // A row written again replaces what was kept for it; one too large is not kept.
        index.cache(3, vec![0; 10]);
        assert_eq!(index.cached_bytes, 3 * quarter + 10);
        index.cache(6, vec![0; quarter + 1]);
        assert!(!index.cached.contains_key(&6));
        assert_eq!(index.uncache(2).map(|d| d.len()), Some(quarter));
        assert_eq!(index.uncache(2), None);
        assert_eq!(index.cached_bytes, 2 * quarter + 10);
    }

    #[test]
    fn a_damaged_row_gives_the_records_before_the_damage() {
        let mut data = Vec::new();
        encode_request(&mut data, 1, "{}");
        let good = data.len();
        encode_request(&mut data, 2, "{\"x\":1}");
        for cut in [good + 1, good + 3, data.len() - 1] {
            let (records, err) = decode(&data[..cut]);
            assert_eq!(records.len(), 1, "cut at {cut}");
            assert!(err.is_some(), "cut at {cut}");
        }
        data.push(b'Z');
        let (records, err) = decode(&data);
        assert_eq!(records.len(), 2);
        assert!(err.unwrap().contains("unknown record tag"));
    }
}
