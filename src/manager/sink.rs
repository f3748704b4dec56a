//! The event sink (`--event-sink`): forwards the leader's domain events to an external
//! collector, an `http://` URL (POST of a JSON array per batch) or a file (one JSON
//! object per line), in the shape of `GET /v1/events` ([`event_json`]).
//!
//! The path of an event, and why each step is there:
//!
//! 1. `apply` does a non-blocking broadcast send (`Manager::events`); nothing here can
//!    slow it down, however slow or dead the sink.
//! 2. The *intake* task moves events from the broadcast into a bounded in-memory queue
//!    ([`SinkConfig::queue_capacity`]); when full, the oldest event is dropped and
//!    counted, so memory stays bounded whatever the sink does.
//! 3. The *delivery* task sends batches through the `event-sink` breaker (in the
//!    manager's resilience registry, so `/v1/health` and `/metrics` show it) with a
//!    timeout per delivery. A failed delivery, or any batch while the breaker is open,
//!    goes to a spool file under the data dir (bounded by [`SinkConfig::spool_max_bytes`];
//!    beyond it the oldest events are dropped and counted).
//! 4. While a spool exists, new events go behind it, so order is kept; once a delivery
//!    succeeds again the spool is replayed in order, chunk by chunk, then removed. At
//!    shutdown the queue is written to the spool, and a restarted manager replays it.
//!
//! **Delivery is at least once, and only the leader forwards.** Every manager applies
//! the same commands; each forwards an event only if it is the leader when it applies
//! it. Around a leader change an event can therefore be delivered twice (the old and
//! the new leader both applied it as leader) or, rarely, not at all (each applied it
//! while not leading). A delivery that timed out may also have arrived and is sent
//! again. Consumers de-duplicate on `(index, kind, subject)`; `index` (the Raft index)
//! grows along the stream.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use holdfast_raft::{ClusterStatus, Role};
use tokio::sync::{broadcast, watch, Notify};

use super::api::events::event_json;
use super::state::DomainEvent;
use super::{lock, Manager};
use crate::resilience::{BreakerConfig, BreakerState, BulkheadConfig, Guard, GuardError};

/// Name of the sink's breaker and bulkhead in the resilience registry.
pub const BREAKER: &str = "event-sink";

/// Directory of the spool, under the node's data dir.
pub const SPOOL_DIR: &str = "event-sink";

/// File name of the spool inside [`SPOOL_DIR`]: one event JSON per line.
pub const SPOOL_FILE: &str = "spool.jsonl";

/// Where events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkTarget {
    /// POST each batch as a JSON array to this `http://` URL; any 2xx is success.
    Http(String),
    /// Append each event as one JSON line to this file.
    File(PathBuf),
}

impl SinkTarget {
    /// Parses `--event-sink`: an `http://` URL or a file path.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("--event-sink is empty; give an http:// URL or a file path".into());
        }
        if s.starts_with("http://") {
            reqwest::Url::parse(s).map_err(|e| format!("--event-sink {s:?} is not a valid URL: {e}"))?;
            return Ok(SinkTarget::Http(s.to_string()));
        }
        if s.starts_with("https://") {
            // The HTTP client is built without TLS (the static binary carries none yet).
            return Err(format!(
                "--event-sink {s:?}: https is not supported by this build; use http:// (e.g. to a local \
                 forwarder) or a file path"
            ));
        }
        if s.contains("://") {
            return Err(format!("--event-sink {s:?}: unknown scheme; use an http:// URL or a file path"));
        }
        Ok(SinkTarget::File(PathBuf::from(s)))
    }
}

impl std::fmt::Display for SinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkTarget::Http(u) => f.write_str(u),
            SinkTarget::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Settings of the event sink.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Where events go.
    pub target: SinkTarget,
    /// Events held in memory waiting for delivery; beyond it the oldest is dropped.
    pub queue_capacity: NonZeroUsize,
    /// Most events in one delivery (and in one replayed chunk of the spool).
    pub batch_max: NonZeroUsize,
    /// How long to wait for more events before delivering a partial batch.
    pub linger: Duration,
    /// Limit of one delivery, connection included.
    pub delivery_timeout: Duration,
    /// How often a waiting spool tries to replay when no new event arrives.
    pub retry_every: Duration,
    /// Largest spool file; beyond it the oldest spooled events are dropped.
    pub spool_max_bytes: u64,
    /// The sink's breaker.
    pub breaker: BreakerConfig,
}

const THREE: NonZeroU32 = NonZeroU32::new(3).unwrap();

impl SinkConfig {
    /// Defaults for `target`: 10,000 queued events, batches of up to 500 after 100 ms,
    /// 5 s per delivery, a 64 MiB spool, a breaker that opens after three failures in
    /// a row and probes every 5 s.
    pub fn new(target: SinkTarget) -> Self {
        SinkConfig {
            target,
            queue_capacity: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            batch_max: NonZeroUsize::new(500).unwrap_or(NonZeroUsize::MIN),
            linger: Duration::from_millis(100),
            delivery_timeout: Duration::from_secs(5),
            retry_every: Duration::from_secs(1),
            spool_max_bytes: 64 << 20,
            breaker: BreakerConfig {
                failure_threshold: THREE,
                success_threshold: NonZeroU32::MIN,
                open_for: Duration::from_secs(5),
            },
        }
    }
}

/// Counters of one sink, since start (also exported as `holdfast_event_sink_*`).
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Events the sink accepted.
    pub delivered: AtomicU64,
    /// Events lost: queue full, broadcast lag, spool full or unwritable.
    pub dropped: AtomicU64,
    /// Events written to the spool.
    pub spooled: AtomicU64,
    /// Deliveries that failed or were refused by the open breaker.
    pub failed_deliveries: AtomicU64,
}

impl SinkStats {
    fn add(&self, counter: &AtomicU64, metric: &'static str, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(metric).increment(n);
    }
}

/// Starts the sink for manager `m`; it runs until `shutdown` fires, then writes what is
/// still queued to the spool under `data_dir` and ends.
pub fn spawn(
    m: &Arc<Manager>,
    config: SinkConfig,
    data_dir: &Path,
    mut shutdown: broadcast::Receiver<()>,
) -> (Arc<SinkStats>, tokio::task::JoinHandle<std::io::Result<()>>) {
    let stats = Arc::new(SinkStats::default());
    let queue = Arc::new(Queue::new(config.queue_capacity.get()));
    let spool_path = data_dir.join(SPOOL_DIR).join(SPOOL_FILE);
    let guard = Guard::new(
        m.resilience.breaker(BREAKER, config.breaker.clone()),
        // One delivery at a time keeps the order; fail-fast because nobody else waits.
        m.resilience.bulkhead(BREAKER, BulkheadConfig::fail_fast(NonZeroUsize::MIN)),
        config.delivery_timeout,
    );
    // A watch, unlike the broadcast, can be awaited again and again by both tasks.
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        let _ = shutdown.recv().await;
        let _ = stop_tx.send(true);
    });
    let intake =
        tokio::spawn(intake(m.events.subscribe(), m.db.watch_status(), queue.clone(), stats.clone(), stop.clone()));
    let http = reqwest::Client::builder()
        .connect_timeout(config.delivery_timeout)
        .timeout(config.delivery_timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default();
    tracing::info!(target = %config.target, spool = %spool_path.display(), "event sink forwarding the leader's events");
    let delivery = Delivery {
        spool: Arc::new(Mutex::new(Spool::open(spool_path, config.spool_max_bytes))),
        config,
        http,
        guard,
        queue,
        stats: stats.clone(),
    };
    let handle = tokio::spawn(async move {
        delivery.run(stop).await;
        let _ = intake.await;
        Ok(())
    });
    (stats, handle)
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens after it sent `true`.
    let _ = stop.wait_for(|s| *s).await;
}

async fn intake(
    mut events: broadcast::Receiver<DomainEvent>,
    status: watch::Receiver<ClusterStatus>,
    queue: Arc<Queue>,
    stats: Arc<SinkStats>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = events.recv() => r,
        };
        match next {
            Ok(e) => {
                // Every manager applies every command; only the leader forwards.
                if status.borrow().role != Role::Leader {
                    continue;
                }
                if queue.push(event_json(&e).to_string()) {
                    stats.add(&stats.dropped, "holdfast_event_sink_dropped_total", 1);
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "event sink intake lagged behind apply; events dropped");
                stats.add(&stats.dropped, "holdfast_event_sink_dropped_total", n);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The bounded queue between intake and delivery; drops the oldest when full.
struct Queue {
    items: Mutex<VecDeque<String>>,
    capacity: usize,
    ready: Notify,
}

impl Queue {
    fn new(capacity: usize) -> Self {
        Queue { items: Mutex::new(VecDeque::new()), capacity: capacity.max(1), ready: Notify::new() }
    }

    /// Adds `line`; true when the oldest event had to be dropped to make room.
    fn push(&self, line: String) -> bool {
        let dropped = {
            let mut q = lock(&self.items);
            let dropped = q.len() >= self.capacity && q.pop_front().is_some();
            q.push_back(line);
            metrics::gauge!("holdfast_event_sink_queued").set(q.len() as f64);
            dropped
        };
        self.ready.notify_one();
        dropped
    }

    fn take(&self, max: usize) -> Vec<String> {
        let mut q = lock(&self.items);
        let n = q.len().min(max);
        let out = q.drain(..n).collect();
        metrics::gauge!("holdfast_event_sink_queued").set(q.len() as f64);
        out
    }

    fn len(&self) -> usize {
        lock(&self.items).len()
    }
}

/// Why one delivery failed.
#[derive(Debug, thiserror::Error)]
enum SinkError {
    #[error("sink answered HTTP {0}")]
    Status(u16),
    #[error("sink unreachable: {0}")]
    Transport(String),
    #[error("sink file: {0}")]
    Io(String),
}

struct Delivery {
    config: SinkConfig,
    http: reqwest::Client,
    guard: Guard,
    queue: Arc<Queue>,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<SinkStats>,
}

impl Delivery {
    async fn run(&self, mut stop: watch::Receiver<bool>) {
        let batch_max = self.config.batch_max.get();
        let mut failing = false;
        loop {
            if self.queue.len() == 0 {
                let spool_waiting = lock(&self.spool).pending();
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    _ = self.queue.ready.notified() => {
                        // Let a burst gather into one delivery.
                        if self.queue.len() < batch_max {
                            tokio::select! {
                                _ = stopped(&mut stop) => break,
                                _ = tokio::time::sleep(self.config.linger) => {}
                            }
                        }
                    }
                    _ = tokio::time::sleep(self.config.retry_every), if spool_waiting => {}
                }
            }
            let batch = self.queue.take(batch_max);
            if lock(&self.spool).pending() {
                // Behind the spool, so the sink sees events in order.
                self.spool_append(batch).await;
                self.replay(&mut stop, &mut failing).await;
                continue;
            }
            if batch.is_empty() {
                continue;
            }
            let outcome = tokio::select! {
                r = self.deliver(&batch) => r,
                _ = stopped(&mut stop) => {
                    // It may have arrived; at least once, so spool it anyway.
                    self.spool_append(batch).await;
                    break;
                }
            };
            match outcome {
                Ok(()) => self.delivered(batch.len(), &mut failing),
                Err(e) => {
                    self.failed(&e, &mut failing);
                    self.spool_append(batch).await;
                }
            }
        }
        // Shutting down: what is still queued goes to the spool for the next start.
        let rest = self.queue.take(usize::MAX);
        self.spool_append(rest).await;
    }

    /// Sends the spool in order until it is empty (then removes it) or a delivery fails.
    async fn replay(&self, stop: &mut watch::Receiver<bool>, failing: &mut bool) {
        // While the breaker is open nothing would be sent: skip reading the spool.
        let breaker = self.guard.breaker.snapshot();
        if breaker.state == BreakerState::Open && !breaker.retry_in.is_zero() {
            return;
        }
        loop {
            // Events that arrive meanwhile go behind the spool: order kept, queue short.
            let fresh = self.queue.take(usize::MAX);
            self.spool_append(fresh).await;
            let spool = self.spool.clone();
            let max = self.config.batch_max.get();
            let chunk = tokio::task::spawn_blocking(move || lock(&spool).read(max)).await;
            let (lines, end, bad) = match chunk {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the event sink spool; will retry");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "event sink spool reader failed; will retry");
                    return;
                }
            };
            if bad > 0 {
                tracing::warn!(lines = bad, "skipped unreadable lines in the event sink spool");
                self.stats.add(&self.stats.dropped, "holdfast_event_sink_dropped_total", bad);
            }
            if !lines.is_empty() {
                let outcome = tokio::select! {
                    r = self.deliver(&lines) => r,
                    _ = stopped(stop) => return,
                };
                if let Err(e) = outcome {
                    self.failed(&e, failing);
                    return;
                }
                self.delivered(lines.len(), failing);
            }
            let spool = self.spool.clone();
            match tokio::task::spawn_blocking(move || lock(&spool).advance(end)).await {
                Ok(Ok(true)) => {
                    tracing::info!("event sink spool replayed and removed");
                    metrics::gauge!("holdfast_event_sink_spool_bytes").set(0.0);
                    return;
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot update the event sink spool; will retry");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "event sink spool update failed; will retry");
                    return;
                }
            }
        }
    }

    fn delivered(&self, n: usize, failing: &mut bool) {
        self.stats.add(&self.stats.delivered, "holdfast_event_sink_delivered_total", n as u64);
        if std::mem::take(failing) {
            tracing::info!(target = %self.config.target, "event sink accepts deliveries again");
        }
    }

    fn failed(&self, e: &GuardError<SinkError>, failing: &mut bool) {
        self.stats.add(&self.stats.failed_deliveries, "holdfast_event_sink_failed_deliveries_total", 1);
        if !std::mem::replace(failing, true) {
            tracing::warn!(target = %self.config.target, error = %e, "event sink delivery failed; spooling events");
        } else {
            tracing::debug!(error = %e, "event sink delivery failed");
        }
    }

    async fn deliver(&self, lines: &[String]) -> Result<(), GuardError<SinkError>> {
        self.guard.run("event-sink.deliver", self.send(lines)).await
    }

    async fn send(&self, lines: &[String]) -> Result<(), SinkError> {
        match &self.config.target {
            SinkTarget::Http(url) => {
                let mut body = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum::<usize>() + 2);
                body.push('[');
                body.push_str(&lines.join(","));
                body.push(']');
                let resp = self
                    .http
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| SinkError::Transport(e.to_string()))?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(SinkError::Status(resp.status().as_u16()))
                }
            }
            SinkTarget::File(path) => {
                let path = path.clone();
                let mut text = lines.join("\n");
                text.push('\n');
                tokio::task::spawn_blocking(move || {
                    let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
                    f.write_all(text.as_bytes())
                })
                .await
                .map_err(|e| SinkError::Io(e.to_string()))?
                .map_err(|e| SinkError::Io(e.to_string()))
            }
        }
    }

    async fn spool_append(&self, lines: Vec<String>) {
        if lines.is_empty() {
            return;
        }
        let n = lines.len() as u64;
        let spool = self.spool.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut s = lock(&spool);
            s.append(&lines).map(|dropped| (dropped, s.len))
        })
        .await;
        match result {
            Ok(Ok((dropped, len))) => {
                self.stats.add(&self.stats.spooled, "holdfast_event_sink_spooled_total", n);
                metrics::gauge!("holdfast_event_sink_spool_bytes").set(len as f64);
                if dropped > 0 {
                    tracing::warn!(dropped, max = self.config.spool_max_bytes, "event sink spool full; oldest dropped");
                    self.stats.add(&self.stats.dropped, "holdfast_event_sink_dropped_total", dropped);
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, events = n, "cannot write the event sink spool; events lost");
                self.stats.add(&self.stats.dropped, "holdfast_event_sink_dropped_total", n);
            }
            Err(e) => {
                tracing::error!(error = %e, events = n, "event sink spool writer failed; events lost");
                self.stats.add(&self.stats.dropped, "holdfast_event_sink_dropped_total", n);
            }
        }
    }
}

/// An append-only file of event lines with a replayed prefix `[0, offset)`; bounded by
/// `max_bytes`. Blocking I/O: call it from `spawn_blocking`.
struct Spool {
    path: PathBuf,
    max_bytes: u64,
    /// Bytes at the front already delivered.
    offset: u64,
    /// File length.
    len: u64,
}

impl Spool {
    /// Opens the spool left by a previous run, if any, cutting a torn last line (a
    /// crash mid-write) so later appends do not glue onto it.
    fn open(path: PathBuf, max_bytes: u64) -> Spool {
        let mut s = Spool { path, max_bytes: max_bytes.max(1), offset: 0, len: 0 };
        if let Err(e) = s.recover() {
            tracing::error!(error = %e, spool = %s.path.display(), "cannot read the event sink spool; starting empty");
            s.len = 0;
        }
        if s.len > 0 {
            tracing::info!(bytes = s.len, "event sink spool from a previous run will be replayed");
        }
        s
    }

    fn recover(&mut self) -> std::io::Result<()> {
        let mut f = match OpenOptions::new().read(true).write(true).open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        // Scan back for the last newline, a page at a time.
        let mut end = len;
        let mut buf = vec![0u8; 4096];
        while end > 0 {
            let start = end.saturating_sub(buf.len() as u64);
            let n = (end - start) as usize;
            f.seek(SeekFrom::Start(start))?;
            f.read_exact(&mut buf[..n])?;
            if let Some(i) = buf[..n].iter().rposition(|b| *b == b'\n') {
                end = start + i as u64 + 1;
                break;
            }
            end = start;
        }
        if end < len {
            f.set_len(end)?;
        }
        self.len = end;
        Ok(())
    }

    fn pending(&self) -> bool {
        self.len > self.offset
    }

    /// Appends `lines`, dropping the oldest spooled events when the file would pass
    /// `max_bytes`; returns how many were dropped.
    fn append(&mut self, lines: &[String]) -> std::io::Result<u64> {
        let size = |l: &String| l.len() as u64 + 1;
        // A batch larger than the whole spool keeps its newest lines.
        let mut skip = 0;
        let mut incoming: u64 = lines.iter().map(size).sum();
        while incoming > self.max_bytes && skip < lines.len() {
            incoming -= size(&lines[skip]);
            skip += 1;
        }
        let mut dropped = skip as u64;
        if self.len + incoming > self.max_bytes {
            // Down to three quarters, so a full spool is not rewritten on every append.
            let keep = (self.max_bytes / 4 * 3).saturating_sub(incoming);
            dropped += self.compact(keep)?;
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut text = String::with_capacity(incoming as usize);
        for l in &lines[skip..] {
            text.push_str(l);
            text.push('\n');
        }
        let mut f = OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(text.as_bytes())?;
        self.len += text.len() as u64;
        Ok(dropped)
    }

    /// Rewrites the spool without its delivered prefix and without its oldest events,
    /// keeping at most `keep` bytes; returns how many events were dropped.
    fn compact(&mut self, keep: u64) -> std::io::Result<u64> {
        let mut sizes = Vec::new();
        let mut src = File::open(&self.path)?;
        src.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::new(src);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            sizes.push(n as u64);
        }
        let total: u64 = sizes.iter().sum();
        let (mut cut, mut dropped) = (0u64, 0usize);
        while total - cut > keep && dropped < sizes.len() {
            cut += sizes[dropped];
            dropped += 1;
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut src = reader.into_inner();
        src.seek(SeekFrom::Start(self.offset + cut))?;
        let mut dst = File::create(&tmp)?;
        std::io::copy(&mut src, &mut dst)?;
        dst.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        self.offset = 0;
        self.len = total - cut;
        Ok(dropped as u64)
    }

    /// Up to `max` lines from the replay position: the valid ones, the offset after
    /// them, and how many unreadable lines were skipped.
    fn read(&self, max: usize) -> std::io::Result<(Vec<String>, u64, u64)> {
        let mut lines = Vec::new();
        if !self.pending() {
            return Ok((lines, self.offset, 0));
        }
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::new(f);
        let (mut end, mut bad) = (self.offset, 0);
        let mut line = String::new();
        while lines.len() < max && end < self.len {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 {
                break;
            }
            end += n as u64;
            let text = line.trim_end_matches('\n');
            // A line the sink would refuse forever must not block the spool.
            if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
                lines.push(text.to_string());
            } else {
                bad += 1;
            }
        }
        Ok((lines, end, bad))
    }

    /// Marks everything before `to` delivered; removes the file once all of it is.
    /// True when the spool is now empty and gone.
    fn advance(&mut self, to: u64) -> std::io::Result<bool> {
        self.offset = to.min(self.len);
        if self.pending() {
            return Ok(false);
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.offset = 0;
        self.len = 0;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|i| format!("{{\"n\":\"{i:04}\"}}")).collect()
    }

    fn drain(s: &mut Spool) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let (l, end, bad) = s.read(3).expect("read");
            assert_eq!(bad, 0);
            out.extend(l);
            if s.advance(end).expect("advance") {
                return out;
            }
        }
    }

    #[test]
    fn sink_targets_parse_from_the_flag() {
        let check =
            |s: &str, want: Result<SinkTarget, ()>| assert_eq!(SinkTarget::parse(s).map_err(|_| ()), want, "{s}");
        check("http://127.0.0.1:9000/events", Ok(SinkTarget::Http("http://127.0.0.1:9000/events".into())));
        check("/var/log/holdfast/events.jsonl", Ok(SinkTarget::File("/var/log/holdfast/events.jsonl".into())));
        check("events.jsonl", Ok(SinkTarget::File("events.jsonl".into())));
        check("https://collector/events", Err(()));
        check("kafka://broker", Err(()));
        check("http://", Err(()));
        check("  ", Err(()));
    }

    #[test]
    fn the_queue_drops_the_oldest_when_full() {
        let q = Queue::new(3);
        let dropped: Vec<bool> = lines(0..5).into_iter().map(|l| q.push(l)).collect();
        assert_eq!(dropped, [false, false, false, true, true]);
        assert_eq!(q.take(10), lines(2..5));
    }

    #[test]
    fn the_spool_replays_in_order_across_appends_and_is_removed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s").join(SPOOL_FILE);
        let mut s = Spool::open(path.clone(), 1 << 20);
        assert_eq!(s.append(&lines(0..5)).expect("append"), 0);
        let (first, end, _) = s.read(2).expect("read");
        assert_eq!(first, lines(0..2));
        assert!(!s.advance(end).expect("advance"));
        s.append(&lines(5..8)).expect("append");
        assert_eq!(drain(&mut s), lines(2..8));
        assert!(!path.exists(), "an emptied spool is removed");
    }

    #[test]
    fn a_full_spool_drops_its_oldest_events_and_stays_bounded() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(SPOOL_FILE);
        // Each line is 13 bytes with its newline: room for 7.
        let mut s = Spool::open(path.clone(), 100);
        let mut dropped = 0;
        for chunk in (0..40).step_by(4) {
            dropped += s.append(&lines(chunk..chunk + 4)).expect("append");
            assert!(std::fs::metadata(&path).expect("spool").len() <= 100);
        }
        let kept = drain(&mut s);
        assert_eq!(dropped as usize + kept.len(), 40, "every event is either kept or counted");
        assert_eq!(kept.last(), Some(&"{\"n\":\"0039\"}".to_string()), "the newest survive");
        let want: Vec<String> = lines(40 - kept.len() as u32..40);
        assert_eq!(kept, want, "what is kept is the newest, in order");
    }

    #[test]
    fn a_torn_last_line_from_a_crash_is_cut_on_open() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(SPOOL_FILE);
        std::fs::write(&path, "{\"n\":1}\n{\"n\":2}\n{\"n\":").expect("write");
        let mut s = Spool::open(path, 1 << 20);
        s.append(&["{\"n\":3}".to_string()]).expect("append");
        assert_eq!(drain(&mut s), ["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
    }
}
