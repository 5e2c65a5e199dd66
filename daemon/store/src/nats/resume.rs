//! Watches that survive a NATS server's death (issue 22), and loads that read to the end.
//!
//! Every watch of a bucket (registrations, plugin state, hourly counts, credentials, ...)
//! is one [`Shared::watch_bucket`]: an async-nats ordered push consumer on the whole
//! bucket, supervised. The supervisor keeps the stream sequence of the last message it
//! delivered; when nothing arrived for [`CHECK`], it asks the stream's last sequence
//! (`STREAM.INFO`, which the stream's leader answers, without the meta leader). When the
//! stream is ahead of what was delivered and nothing arrives for [`STALL`] more, or when
//! the consumer ends, it drops the consumer and makes a new one from the last sequence
//! delivered + 1 (`DeliverPolicy::ByStartSequence`, a new server-chosen name), in short
//! attempts ([`Shared::attempts`]) until one works. Each restart logs two lines (stopped,
//! resumed), at most one restart per [`STALL`]: bounded.
//!
//! Why (found by `every_node_lists_every_registration_after_a_nats_server_dies`): after
//! the server leading a bucket is killed (3 servers, R3, nats-server 2.9.10), an ordered
//! consumer left alone by async-nats 0.52 is at times never made again: its requests to
//! re-create the consumer (under the same derived name, `<name>_1`) go unanswered while
//! writes to the bucket work. A new consumer made by us under a new name is answered.
//!
//! Decision, push consumer kept rather than polling with direct gets (`STREAM.MSG.GET`
//! `next_by_subj`, which only the stream's leader answers and so needs no consumer): a
//! direct get is one round trip per message and finds new messages only by polling,
//! so a watch would either lag by its polling period or load the stream's leader with a
//! request per period per watch per node even when idle, and catching up (a node's start
//! reads every registration through its watch) would be one round trip per registration.
//! Measured on a 3-server R3 cluster on loopback: 2 000 messages read by direct gets in
//! 0.90 to 0.95 s, by a pull consumer in 0.09 to 0.15 s. The supervised push consumer
//! delivers at once and in bulk, and the supervision costs one `STREAM.INFO` per idle
//! watch per [`CHECK`]. With it, in
//! `every_node_lists_every_registration_after_a_nats_server_dies`, the watches that
//! stalled resumed 2 ms to 2.7 s after their restart began. The supervision's own
//! requests (`STREAM.INFO`) are answered by the stream's leader, like a direct get; only
//! making the new consumer needs the meta leader, which is elected again within 5 to 25 s
//! of its server's loss.
//!
//! Loads ([`Shared::read_all`]): the target is the last sequence matching the filter as
//! the stream's leader knows it (a direct get `last_by_subj`), not the pending count a new
//! consumer reports (a consumer is placed on a replica, which may not yet have every
//! message the leader acknowledged, and then reports fewer pending, 0 for an empty
//! replica). A load reads until it delivered that sequence; a consumer that stops
//! short (a batch expiring without messages) is replaced by one starting after the last
//! message read, up to [`LOAD_TRIES`] consumers in a row without progress, then the load
//! fails `unavailable`. When no consumer can be made within the timeout (no meta leader
//! yet: 5 to 25 s after its server's loss), the load reads the rest message by message
//! from the stream's leader ([`Shared::list_direct`]'s requests): slow for a big bucket
//! (about 0.45 ms a message here), but it needs no meta leader. Why: a node started
//! just after a server's death once failed its start with "reading: timed out", which
//! is [`Shared::attempts`] failing to make a load's consumer within the timeout. (Its
//! "loaded 0 stored registrations" was not a symptom: the daemon counts only the node's
//! own registrations there, 0 for a new node.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Raw, Shared, unavailable};
use crate::StoreError;

/// How long a watch waits without a message before it asks the stream's last sequence.
pub(super) const CHECK: Duration = Duration::from_secs(1);
/// How long a watch may stay behind the stream without a message before it is restarted.
pub(super) const STALL: Duration = Duration::from_secs(3);
/// Consumers in a row a load makes without reading a message before it fails.
const LOAD_TRIES: u32 = 3;

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    /// Every key's current value first (`LastPerSubject`), then every change.
    Current,
    /// Only the changes after the watch is made.
    New,
    /// The changes after this stream sequence (one read before, so nothing falls between).
    After(u64),
}

impl Shared {
    /// The stream's last sequence, as its leader answers `STREAM.INFO` (0 when empty).
    pub(super) async fn last_sequence(&self, stream: &str) -> Result<u64, StoreError> {
        let stream = self.stream(stream)?;
        let info = tokio::time::timeout(self.timeout, stream.get_info())
            .await
            .map_err(|_| unavailable("stream info timed out"))?
            .map_err(unavailable)?;
        Ok(info.state.last_sequence)
    }

    /// The sequence of the last message matching `filter` as the stream's leader knows it
    /// (`STREAM.MSG.GET` `last_by_subj`), `None` when there is none.
    async fn last_matching(&self, stream: &str, filter: &str) -> Result<Option<u64>, StoreError> {
        let stream = self.stream(stream)?;
        let got = tokio::time::timeout(
            self.timeout,
            stream.raw_message_builder().last_by_subject(filter).send(),
        )
        .await
        .map_err(|_| unavailable("reading the last message timed out"))?;
        match got {
            Ok(m) => Ok(Some(m.sequence)),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// [`Shared::read_all`] when the leader finds no last message matching `filter`: the
    /// stream may still hold matching messages. nats-server 2.9 answers "no message found"
    /// to a last-by-subject get once the last message of a subject was deleted while
    /// earlier ones of that subject remain (seen in the store's conformance test when a
    /// device-request, issue 23, is answered before one queued earlier on the same
    /// endpoint). Rare, so read message by message (deleted sequences are skipped by the
    /// server), and only when the stream holds any message at all.
    async fn read_without_last(&self, stream: &str, filter: &str) -> Result<Vec<Raw>, StoreError> {
        let handle = self.stream(stream)?;
        let info = tokio::time::timeout(self.timeout, handle.get_info())
            .await
            .map_err(|_| unavailable("stream info timed out"))?
            .map_err(unavailable)?;
        let mut out = Vec::new();
        if info.state.messages > 0 {
            self.list_direct_from(
                stream,
                filter,
                info.state.first_sequence.max(1),
                info.state.last_sequence,
                &mut out,
            )
            .await?;
        }
        Ok(out)
    }

    /// Follows the whole bucket from `start`, calling `each(message, live)` in the stream's
    /// order, each message once, `live` for messages after the bucket's last one when the
    /// watch was made (always with [`Start::New`]). `caught_up` fires once the watch
    /// delivered that last message (at once for an empty bucket or [`Start::New`]).
    /// Fails (`unavailable`) when the bucket's last sequence cannot be read within the
    /// timeout, or, with `caught_up`, when the first consumer cannot be made within it
    /// (without, that consumer is made in the background); after that, the watch resumes
    /// by itself (module doc).
    pub(super) async fn watch_bucket(
        self: Arc<Self>,
        what: &'static str,
        bucket: String,
        start: Start,
        headers_only: bool,
        caught_up: Option<oneshot::Sender<Result<(), StoreError>>>,
        mut each: impl FnMut(&Shared, Raw, bool) + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let stream = format!("KV_{bucket}");
        let target = match start {
            Start::After(seq) => seq,
            Start::Current | Start::New => {
                self.attempts(&format!("watching {bucket}"), || {
                    self.last_sequence(&stream)
                })
                .await?
            }
        };
        // The last sequence delivered (or, for `New` and `After`, skipped).
        let mut last = if start == Start::Current { 0 } else { target };
        let policy = move |last: u64| {
            if last == 0 {
                consumer::DeliverPolicy::LastPerSubject
            } else {
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: last + 1,
                }
            }
        };
        // A watch whose caller waits for it to catch up fails here if no consumer can be
        // made within the timeout; the others start without one and make it in the
        // background (a node starting while the meta leader is being elected again).
        let first = match self.ordered(&bucket, policy(last), headers_only).await {
            Ok((m, _)) => Some(m),
            Err(e) if caught_up.is_none() => {
                tracing::warn!(
                    "store: the {what} watch has no consumer yet ({e}); making one in the background"
                );
                None
            }
            Err(e) => return Err(e),
        };
        let mut caught_up = caught_up;
        if last >= target
            && let Some(c) = caught_up.take()
        {
            let _ = c.send(Ok(()));
        }
        Ok(tokio::spawn(async move {
            let mut messages = match first {
                Some(m) => m,
                None => {
                    let (m, tries) = self.remake(what, &bucket, policy(last), headers_only).await;
                    tracing::warn!(
                        "store: the {what} watch started after {tries} rounds of consumer attempts"
                    );
                    m
                }
            };
            let mut restarts = 0u64;
            let mut last_message = Instant::now();
            // Since when the stream is known to be ahead of `last`, and how far.
            let mut behind: Option<(Instant, u64)> = None;
            let mut ticks = tokio::time::interval(CHECK);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stalled = tokio::select! {
                    m = messages.next() => match m {
                        Some(Ok(m)) => {
                            let Ok(info) = m.info() else { continue };
                            let seq = info.stream_sequence;
                            if seq <= last {
                                continue;
                            }
                            last = seq;
                            last_message = Instant::now();
                            behind = behind.filter(|(_, ahead)| *ahead > seq);
                            let m = m.message;
                            let raw = Raw {
                                subject: m.subject.to_string(),
                                headers: m.headers,
                                payload: m.payload,
                                seq,
                            };
                            each(&self, raw, seq > target);
                            if seq >= target
                                && let Some(c) = caught_up.take()
                            {
                                let _ = c.send(Ok(()));
                            }
                            None
                        }
                        Some(Err(e)) => {
                            tracing::debug!("store: the {what} watch: {e}");
                            None
                        }
                        None => Some("the consumer ended".to_string()),
                    },
                    _ = ticks.tick() => {
                        if last_message.elapsed() < CHECK {
                            None
                        } else {
                            match self.last_sequence(&stream).await {
                                Ok(end) if end > last => {
                                    let since = behind.map_or_else(Instant::now, |(t, _)| t);
                                    behind = Some((since, end));
                                    (since.elapsed() >= STALL && last_message.elapsed() >= STALL)
                                        .then(|| format!("the bucket is at {end}"))
                                }
                                Ok(_) => {
                                    behind = None;
                                    None
                                }
                                Err(e) => {
                                    tracing::debug!("store: the {what} watch: {e}");
                                    None
                                }
                            }
                        }
                    }
                };
                let Some(why) = stalled else { continue };
                restarts += 1;
                tracing::warn!(
                    "store: the {what} watch stopped after stream sequence {last} ({why}); \
                     making a new consumer (restart {restarts})"
                );
                let stopped = Instant::now();
                let tries;
                (messages, tries) = self.remake(what, &bucket, policy(last), headers_only).await;
                tracing::warn!(
                    "store: the {what} watch resumed after stream sequence {last}, {:?} \
                     after it stopped ({tries} rounds of consumer attempts)",
                    stopped.elapsed()
                );
                last_message = Instant::now();
                behind = None;
            }
        }))
    }

    /// A new ordered consumer on `bucket`, in rounds of short attempts until one is made,
    /// and how many rounds it took.
    async fn remake(
        &self,
        what: &str,
        bucket: &str,
        policy: consumer::DeliverPolicy,
        headers_only: bool,
    ) -> (consumer::push::Ordered, u64) {
        let mut tries = 0u64;
        loop {
            tries += 1;
            match self.ordered(bucket, policy, headers_only).await {
                Ok((m, _)) => return (m, tries),
                Err(e) => {
                    tracing::debug!("store: the {what} watch: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Every message of `stream` matching `filter` (last per subject for a bucket), in the
    /// stream's order, through the last one the stream's leader knows of when the read
    /// starts (module doc); KV delete markers included.
    pub(super) async fn read_all(
        &self,
        stream_name: &str,
        filter: String,
        policy: consumer::DeliverPolicy,
        headers_only: bool,
    ) -> Result<Vec<Raw>, StoreError> {
        let stream = self.stream(stream_name)?;
        let Some(target) = self
            .attempts("reading", || self.last_matching(stream_name, &filter))
            .await?
        else {
            return self.read_without_last(stream_name, &filter).await;
        };
        let by_subject = policy == consumer::DeliverPolicy::LastPerSubject;
        let mut out: Vec<Raw> = Vec::new();
        let mut last = 0u64;
        let mut fruitless = 0;
        while last < target {
            let config = consumer::pull::Config {
                deliver_policy: if last == 0 {
                    policy
                } else {
                    consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: last + 1,
                    }
                },
                ack_policy: consumer::AckPolicy::None,
                filter_subject: filter.clone(),
                headers_only,
                memory_storage: true,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            };
            let consumer: consumer::PullConsumer = match self
                .attempts("reading", || stream.create_consumer(config.clone()))
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    // No consumer within the timeout (no meta leader yet, or placed on a
                    // lost server): the rest message by message from the stream's leader.
                    tracing::info!(
                        "store: reading {stream_name} message by message after stream \
                         sequence {last} ({e})"
                    );
                    self.list_direct_from(stream_name, &filter, last + 1, target, &mut out)
                        .await?;
                    break;
                }
            };
            if consumer.cached_info().num_pending == 0 {
                // The case the pending count got wrong (module doc); rare, so logged.
                tracing::info!(
                    "store: a new consumer of {stream_name} reported nothing pending; \
                     reading on to stream sequence {target}"
                );
            }
            let before = last;
            let read = self
                .read_consumer(&consumer, target, &mut last, &mut out)
                .await;
            let name = consumer.cached_info().name.clone();
            let _ = stream.delete_consumer(&name).await;
            if let Err(e) = read {
                tracing::debug!("store: reading {stream_name}: {e}");
            }
            if last == before {
                fruitless += 1;
                if fruitless >= LOAD_TRIES {
                    return Err(unavailable(format!(
                        "reading: stopped after stream sequence {last} of {target}"
                    )));
                }
            } else {
                fruitless = 0;
            }
        }
        if by_subject && out.len() > 1 {
            // A consumer made again after the first delivers every message after the
            // last read, so a subject may come twice: its last one counts.
            let mut at: HashMap<&str, usize> = HashMap::with_capacity(out.len());
            for (i, m) in out.iter().enumerate() {
                at.insert(m.subject.as_str(), i);
            }
            let keep: Vec<bool> = (0..out.len())
                .map(|i| at.get(out[i].subject.as_str()) == Some(&i))
                .collect();
            let mut i = 0;
            out.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        Ok(out)
    }

    /// Reads `consumer` in batches until it delivered `target` or a batch ends empty.
    async fn read_consumer(
        &self,
        consumer: &consumer::PullConsumer,
        target: u64,
        last: &mut u64,
        out: &mut Vec<Raw>,
    ) -> Result<(), StoreError> {
        while *last < target {
            let mut batch = consumer
                .batch()
                .max_messages(1024)
                .expires(self.timeout)
                .messages()
                .await
                .map_err(unavailable)?;
            let mut got = 0u64;
            while let Some(m) = batch.next().await {
                let m = m.map_err(unavailable)?;
                let seq = m.info().map_err(unavailable)?.stream_sequence;
                if seq <= *last {
                    continue;
                }
                *last = seq;
                let m = m.message;
                out.push(Raw {
                    subject: m.subject.to_string(),
                    headers: m.headers,
                    payload: m.payload,
                    seq,
                });
                got += 1;
                if seq >= target {
                    return Ok(());
                }
            }
            if got == 0 {
                return Err(unavailable("reading: a batch ended empty"));
            }
        }
        Ok(())
    }
}
