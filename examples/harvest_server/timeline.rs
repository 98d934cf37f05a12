//! `GET /sessions/{id}/timeline`: a session's timeline summarized on the server, so that
//! the page draws a 100,000-resource session as fast as a 10-resource one: outcome counts
//! per time bucket, the watchdog's and the finalizer's marks, the first failures with their
//! error text, and one lane per resource only when there are few. The log is read page by
//! page and folded as it comes (memory bounded by the buckets, the lanes kept and the
//! failures kept, never by the log). The page then follows the event stream from
//! `last_seq` and updates the summary in place.

use chrono::{DateTime, Utc};
use harvest_supervisor::budget::BudgetSource;
use harvest_supervisor::{EventKind, FinalizeReason, OutcomeCounts, SessionEvent, SessionRecord};

use super::*;

/// Buckets by default, and at most.
const DEFAULT_BUCKETS: usize = 120;
const MAX_BUCKETS: usize = 1000;
/// Sessions of at most this many resources get a lane per resource.
pub(crate) const MAX_LANES: usize = 200;
/// Failures listed with their text (the count says how many there were in all).
const MAX_FAILURES: usize = 100;
/// Monitor ticks kept (a long session's are thinned to every n-th).
const MAX_TICKS: usize = 500;
/// Events per store read.
const PAGE: usize = 5000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TimelineQuery {
    buckets: Option<usize>,
}

/// Outcome kinds in the order of `Bucket` counts.
const KINDS: [&str; 6] = [
    "succeeded",
    "failed",
    "panicked",
    "timed-out",
    "cancelled",
    "lost",
];

/// One resource's lane: offsets in ms from `t0`.
#[derive(Serialize)]
pub(crate) struct Lane {
    resource_id: String,
    start_ms: f64,
    end_ms: Option<f64>,
    /// The outcome's kind once ended; `None` while running.
    outcome: Option<&'static str>,
    attempts: u32,
}

#[derive(Serialize)]
pub(crate) struct Failure {
    resource_id: String,
    outcome: &'static str,
    /// The error or panic text (`null` for a timeout).
    text: Option<String>,
    at_ms: f64,
    attempt: u32,
}

#[derive(Serialize, Default)]
pub(crate) struct Marks {
    /// Monitor ticks (every `tick_every`-th when there were many).
    ticks_ms: Vec<f64>,
    tick_every: usize,
    deadline_expired_ms: Option<f64>,
    escalated_ms: Option<f64>,
    abort_requested_ms: Option<f64>,
    finalizer_started_ms: Option<f64>,
    finalizer_finished_ms: Option<f64>,
    taken_over_ms: Vec<f64>,
    lease_lost_ms: Vec<f64>,
}

#[derive(Serialize)]
pub(crate) struct Timeline {
    record: SessionRecord,
    /// Resources ended so far by outcome: the record's once it is finished, else those of
    /// the events folded (the stream from `last_seq` adds the rest).
    counts: OutcomeCounts,
    /// When the session started (the axis' zero).
    t0: DateTime<Utc>,
    /// The axis' end, in ms from `t0`: the session's end, or now while it runs (at least
    /// its deadline, so that the deadline is on the axis).
    span_ms: f64,
    /// The deadline, in ms from `t0`.
    deadline_ms: f64,
    /// How the budget was chosen (static, or learned from the harvester's history), and
    /// the same in one line for a person; `null` when the session's config could not be
    /// read.
    budget: Option<BudgetSource>,
    budget_text: Option<String>,
    bucket_ms: f64,
    /// Outcome kinds, in the order of each bucket's counts.
    kinds: [&'static str; 6],
    /// Per bucket, the resources that ended in it, by kind.
    buckets: Vec<[u64; 6]>,
    /// Attempts started (a retry counts again).
    attempts_started: u64,
    retries: u64,
    marks: Marks,
    failures: Vec<Failure>,
    failures_total: u64,
    /// One per resource, in the order they started; `null` past `MAX_LANES` resources.
    lanes: Option<Vec<Lane>>,
    /// The last event folded: follow the stream from here.
    last_seq: u64,
}

fn offset_ms(t0: DateTime<Utc>, at: DateTime<Utc>) -> f64 {
    (at - t0).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

/// The kind index of a resource's ending event, with its failure text.
fn ending(kind: &EventKind) -> Option<(usize, Option<&str>)> {
    match kind {
        EventKind::WorkerSucceeded { .. } => Some((0, None)),
        EventKind::WorkerFailed { error, .. } => Some((1, Some(error))),
        EventKind::WorkerPanicked { message, .. } => Some((2, Some(message))),
        EventKind::WorkerTimedOut {
            heartbeat_silent, ..
        } => Some((3, heartbeat_silent.then_some("heartbeat silent"))),
        EventKind::WorkerCancelled { .. } => Some((4, None)),
        _ => None,
    }
}

fn resource_of(kind: &EventKind) -> Option<&str> {
    kind.resource_id().map(|r| r.as_str())
}

struct Fold {
    t0: DateTime<Utc>,
    bucket_ms: f64,
    buckets: Vec<[u64; 6]>,
    /// Ended per kind, to reconcile with the record's counts at the end.
    ended: [u64; 6],
    attempts_started: u64,
    retries: u64,
    marks: Marks,
    ticks_seen: usize,
    failures: Vec<Failure>,
    failures_total: u64,
    lanes: Option<(Vec<Lane>, HashMap<String, usize>)>,
    /// Each resource's ending counted so far, by a hash of its id (one small entry per
    /// resource that ended): taken back when the resource starts again (a retry, an
    /// attempt cut by the node's fencing and run again, a resumed session), so that only
    /// its final ending counts.
    ends: HashMap<u64, End>,
    hasher: std::collections::hash_map::RandomState,
    last_seq: u64,
    /// The log's last event, `SessionFinished`, was folded: the summary is final.
    finished: bool,
}

/// A resource's ending as counted: when, which kind, whether its failure is in the list.
struct End {
    at: f64,
    kind: usize,
    kept: bool,
}

impl Fold {
    fn bucket(&mut self, at_ms: f64) -> &mut [u64; 6] {
        let last = self.buckets.len() - 1;
        let i = (at_ms.max(0.0) / self.bucket_ms) as usize;
        &mut self.buckets[i.min(last)]
    }

    fn event(&mut self, e: &SessionEvent) {
        self.last_seq = e.seq;
        self.finished |= matches!(e.kind, EventKind::SessionFinished { .. });
        let at = offset_ms(self.t0, e.at);
        let kind = &e.kind;
        match kind {
            EventKind::WorkerStarted { .. } => self.attempts_started += 1,
            EventKind::WorkerRetrying { .. } => self.retries += 1,
            EventKind::MonitorTick { .. } => {
                // Every `tick_every`-th; when full, keep every other one and double it.
                if self.ticks_seen.is_multiple_of(self.marks.tick_every) {
                    if self.marks.ticks_ms.len() >= MAX_TICKS {
                        let kept = self.marks.ticks_ms.iter().copied().step_by(2).collect();
                        self.marks.ticks_ms = kept;
                        self.marks.tick_every *= 2;
                    }
                    if self.ticks_seen.is_multiple_of(self.marks.tick_every) {
                        self.marks.ticks_ms.push(at);
                    }
                }
                self.ticks_seen += 1;
            }
            EventKind::DeadlineExpired => self.marks.deadline_expired_ms = Some(at),
            EventKind::MonitorEscalated { .. } => self.marks.escalated_ms = Some(at),
            EventKind::AbortRequested => self.marks.abort_requested_ms = Some(at),
            EventKind::FinalizerStarted { .. } => {
                self.marks.finalizer_started_ms.get_or_insert(at);
            }
            EventKind::FinalizerFinished { .. } => self.marks.finalizer_finished_ms = Some(at),
            EventKind::SessionTakenOver { .. } => self.marks.taken_over_ms.push(at),
            EventKind::LeaseLost { .. } => self.marks.lease_lost_ms.push(at),
            _ => {}
        }
        // A retried attempt's failure is not the resource's end: only the final one is
        // (a `WorkerRetrying` follows a failure that will be retried).
        if let Some((k, text)) = ending(kind) {
            let resource = resource_of(kind).unwrap_or_default();
            // A resource's ending event is never a retried one's: see `unend`.
            self.bucket(at)[k] += 1;
            self.ended[k] += 1;
            // Ended again without a start between (not seen in practice): the first ending
            // is replaced.
            self.unend(resource);
            let mut kept = false;
            if k != 0 {
                self.failures_total += 1;
                kept = self.failures.len() < MAX_FAILURES;
                if kept {
                    let attempt = match kind {
                        EventKind::WorkerFailed { attempt, .. }
                        | EventKind::WorkerPanicked { attempt, .. }
                        | EventKind::WorkerTimedOut { attempt, .. }
                        | EventKind::WorkerCancelled { attempt, .. } => *attempt,
                        _ => 0,
                    };
                    self.failures.push(Failure {
                        resource_id: resource.to_owned(),
                        outcome: KINDS[k],
                        text: text.map(str::to_owned),
                        at_ms: at,
                        attempt,
                    });
                }
            }
            let key = self.key(resource);
            self.ends.insert(key, End { at, kind: k, kept });
        }
        if let EventKind::WorkerRetrying { resource_id, .. }
        | EventKind::WorkerStarted { resource_id, .. } = kind
        {
            self.unend(resource_id.as_str());
        }
        if let (Some((lanes, index)), Some(resource)) = (&mut self.lanes, resource_of(kind)) {
            let i = *index.entry(resource.to_owned()).or_insert_with(|| {
                lanes.push(Lane {
                    resource_id: resource.to_owned(),
                    start_ms: at,
                    end_ms: None,
                    outcome: None,
                    attempts: 0,
                });
                lanes.len() - 1
            });
            let lane = &mut lanes[i];
            match kind {
                EventKind::WorkerStarted { attempt, .. } => {
                    lane.attempts = *attempt;
                    lane.end_ms = None;
                    lane.outcome = None;
                }
                EventKind::WorkerRetrying { .. } => {
                    lane.end_ms = None;
                    lane.outcome = None;
                }
                _ => {
                    if let Some((k, _)) = ending(kind) {
                        lane.end_ms = Some(at);
                        lane.outcome = Some(KINDS[k]);
                    }
                }
            }
        }
    }

    fn key(&self, resource: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, resource)
    }

    /// Takes back `resource`'s counted ending, if any: it was not its last.
    fn unend(&mut self, resource: &str) {
        let key = self.key(resource);
        let Some(end) = self.ends.remove(&key) else {
            return;
        };
        let bucket = self.bucket(end.at);
        bucket[end.kind] = bucket[end.kind].saturating_sub(1);
        self.ended[end.kind] = self.ended[end.kind].saturating_sub(1);
        if end.kind != 0 {
            self.failures_total = self.failures_total.saturating_sub(1);
        }
        if end.kept
            && let Some(i) = self
                .failures
                .iter()
                .rposition(|f| f.resource_id == resource && f.at_ms == end.at)
        {
            self.failures.remove(i);
        }
    }
}

/// The summary of session `id`'s log so far.
pub(crate) async fn timeline(
    State(app): State<App>,
    SessionPath(id): SessionPath,
    JsonQuery(q): JsonQuery<TimelineQuery>,
) -> Result<Response, ApiError> {
    let buckets = match q.buckets {
        None => DEFAULT_BUCKETS,
        Some(n) if (1..=MAX_BUCKETS).contains(&n) => n,
        Some(_) => {
            return Err(bad_request(
                "buckets",
                format!("buckets must be 1 to {MAX_BUCKETS}"),
            ));
        }
    };
    let json = |body: axum::body::Bytes, status: &'static str| {
        (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::HeaderName::from_static("cache-status"), status),
            ],
            body,
        )
            .into_response()
    };
    if let Some(body) = app.timelines.done.get(&(id, buckets)) {
        return Ok(json(body, "harvest-server; hit"));
    }
    // A fold of a long log keeps a core busy while it reads and folds page after page:
    // a few at a time, the others wait their turn (never the supervision).
    // (Never closed: a turn always comes.)
    let _turn = app.timelines.folds.acquire().await.ok();
    let (timeline, finished) = fold(&app, id, buckets).await?;
    let body = axum::body::Bytes::from(serde_json::to_vec(&timeline).map_err(|e| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": e.to_string(), "code": "unavailable" }),
        )
    })?);
    if finished {
        // A finished session's log never changes: its summary is served as it is.
        app.timelines.done.insert((id, buckets), body.clone());
    }
    Ok(json(body, "harvest-server; fwd=miss"))
}

/// Session `id`'s summary over `buckets`, and whether it is final (the session's log
/// was folded to its end).
async fn fold(app: &App, id: SessionId, buckets: usize) -> Result<(Timeline, bool), ApiError> {
    let record = app.supervisor.session(id).await?;
    let t0 = record.started;
    let deadline_ms = record.workflow_time.as_secs_f64() * 1000.0;
    let end = record.ended.unwrap_or_else(Utc::now);
    let mut span_ms = offset_ms(t0, end).max(1.0);
    if record.ended.is_none() {
        span_ms = span_ms.max(deadline_ms.min(span_ms * 4.0));
    }
    let mut fold = Fold {
        t0,
        bucket_ms: span_ms / buckets as f64,
        buckets: vec![[0; 6]; buckets],
        ended: [0; 6],
        attempts_started: 0,
        retries: 0,
        marks: Marks {
            tick_every: 1,
            ..Marks::default()
        },
        ticks_seen: 0,
        failures: Vec::new(),
        failures_total: 0,
        lanes: (record.total <= MAX_LANES).then(|| (Vec::new(), HashMap::new())),
        ends: HashMap::new(),
        hasher: std::collections::hash_map::RandomState::new(),
        last_seq: 0,
        finished: false,
    };
    loop {
        let page = app.supervisor.events_after(id, fold.last_seq, PAGE).await?;
        if page.is_empty() {
            break;
        }
        for e in &page {
            fold.event(e);
        }
        if page.len() < PAGE {
            break;
        }
    }
    // Read again: what the fold saw may be newer than the first read (the session may
    // even have finished meanwhile: the stream then starts after its end).
    let record = app.supervisor.session(id).await?;
    let counts = if record.ended.is_some() {
        record.counts
    } else {
        // While it runs, the counts of what was folded: the stream adds the rest.
        let e = fold.ended;
        let n = |k: usize| usize::try_from(e[k]).unwrap_or(usize::MAX);
        OutcomeCounts {
            succeeded: n(0),
            failed: n(1),
            panicked: n(2),
            timed_out: n(3),
            cancelled: n(4),
            lost: n(5),
        }
    };
    // A finished session's resources with no ending event (killed with their session:
    // an abort, a deadline, a crash) end with it, as the record counts them.
    if let Some(ended) = record.ended {
        let at = offset_ms(t0, ended);
        let counts = record.counts;
        let want = [
            counts.succeeded,
            counts.failed,
            counts.panicked,
            counts.timed_out,
            counts.cancelled,
            counts.lost,
        ];
        for (k, want) in want.into_iter().enumerate() {
            let missing = (want as u64).saturating_sub(fold.ended[k]);
            fold.bucket(at)[k] += missing;
        }
        let missing = record
            .reason()
            .unwrap_or(FinalizeReason::Completed)
            .missing_outcome();
        if let Some((lanes, _)) = &mut fold.lanes {
            for lane in lanes.iter_mut().filter(|l| l.outcome.is_none()) {
                lane.end_ms = Some(at);
                lane.outcome = Some(
                    KINDS
                        .iter()
                        .copied()
                        .find(|k| *k == missing.name())
                        .unwrap_or("lost"),
                );
            }
        }
    }
    // From the stored config, not the log: a memory store keeps only a session's newest
    // events, and `SessionStarted` is the first.
    let budget = match app.supervisor.store().session_config(id).await {
        Ok(config) => Some(config.map_or(BudgetSource::Static, |c| c.budget_source().clone())),
        Err(error) => {
            tracing::warn!(session_id = %id, %error, "the session's config could not be read");
            None
        }
    };
    let finished = fold.finished && record.ended.is_some();
    let timeline = Timeline {
        counts,
        t0,
        span_ms,
        deadline_ms,
        budget_text: budget.as_ref().map(ToString::to_string),
        budget,
        bucket_ms: fold.bucket_ms,
        kinds: KINDS,
        buckets: fold.buckets,
        attempts_started: fold.attempts_started,
        retries: fold.retries,
        marks: fold.marks,
        failures: fold.failures,
        failures_total: fold.failures_total,
        lanes: fold.lanes.map(|(lanes, _)| lanes),
        last_seq: fold.last_seq,
        record,
    };
    Ok((timeline, finished))
}

/// Finished sessions' timelines, and the folds running at once.
pub(crate) struct Timelines {
    /// Serialized, by session and buckets: a finished session's log never changes.
    done: quick_cache::sync::Cache<(SessionId, usize), axum::body::Bytes>,
    /// A permit per fold running.
    folds: tokio::sync::Semaphore,
}

/// Finished sessions' timelines kept at most (each at most a few hundred KiB: the
/// buckets, lanes, failures and ticks are all capped).
const CACHED_TIMELINES: usize = 64;
/// Folds running at once at most (one per core on the reference machine).
const FOLDS: usize = 2;

impl Timelines {
    pub(crate) fn new() -> Self {
        Self {
            done: quick_cache::sync::Cache::new(CACHED_TIMELINES),
            folds: tokio::sync::Semaphore::new(FOLDS),
        }
    }
}

use std::collections::HashMap;

/// Events at the end of a running session's log looked at for its warnings.
const TAIL: u64 = 500;
/// Most active sessions listed per status.
const MAX_ACTIVE: usize = 1000;

/// One running session, as the page's "now" panel shows it.
#[derive(Serialize)]
pub(crate) struct Active {
    record: SessionRecord,
    /// Resources with an outcome so far.
    done: usize,
    /// When the deadline passes, and how long until then (negative once past).
    deadline: DateTime<Utc>,
    deadline_in_ms: f64,
    /// What needs an operator's eye: `deadline passed`, `escalated`, `heartbeat silent`,
    /// `timeouts`, `taken over`, `lease lost`, `abort requested`, `finalizing`.
    warnings: Vec<String>,
}

#[derive(Serialize)]
pub(crate) struct Now {
    now: DateTime<Utc>,
    /// Running sessions (pending, on-going, aborting), oldest first: one per busy harvester.
    active: Vec<Active>,
}

/// `GET /now`: what runs right now, with its progress, its deadline and its warnings.
/// What `/now` warns of beyond the record.
struct Signals {
    escalated: bool,
    timeouts: usize,
    silent: usize,
    lease_lost: bool,
    /// What the counts cover, when not the whole session (" in the last 500 events").
    within: String,
}

/// The signals of a session another server runs, from the end of its log (two reads).
async fn tail_signals(app: &App, id: SessionId) -> Result<Signals, ApiError> {
    let store = app.supervisor.store();
    let last = store.last_event_seq(id).await.map_err(SessionError::from)?;
    let tail = app
        .supervisor
        .events_after(id, last.saturating_sub(TAIL), TAIL as usize)
        .await?;
    let mut signals = Signals {
        escalated: false,
        timeouts: 0,
        silent: 0,
        lease_lost: false,
        within: format!(" in the last {TAIL} events"),
    };
    for e in &tail {
        match e.kind {
            EventKind::MonitorEscalated { .. } => signals.escalated = true,
            EventKind::WorkerTimedOut {
                heartbeat_silent: true,
                ..
            } => signals.silent += 1,
            EventKind::WorkerTimedOut { .. } => signals.timeouts += 1,
            EventKind::LeaseLost { .. } => signals.lease_lost = true,
            EventKind::LeaseRenewed { .. } => signals.lease_lost = false,
            _ => {}
        }
    }
    Ok(signals)
}

pub(crate) async fn now(State(app): State<App>) -> Result<Json<Now>, ApiError> {
    let now = Utc::now();
    let mut records = Vec::new();
    for status in [
        SessionStatus::Pending,
        SessionStatus::OnGoing,
        SessionStatus::Aborting,
    ] {
        let page = app
            .supervisor
            .history(&SessionQuery {
                status: Some(status),
                limit: MAX_ACTIVE,
                ..SessionQuery::default()
            })
            .await?;
        records.extend(page.sessions);
    }
    records.sort_by_key(|r| r.started);
    let mut active = Vec::with_capacity(records.len());
    for record in records {
        let budget =
            chrono::Duration::from_std(record.workflow_time).unwrap_or(chrono::Duration::MAX);
        let deadline = record
            .started
            .checked_add_signed(budget)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let deadline_in_ms = (deadline - now).num_milliseconds() as f64;
        let mut warnings = Vec::new();
        if deadline_in_ms < 0.0 {
            warnings.push("deadline passed".to_owned());
        }
        if record.epoch > 1 {
            warnings.push("taken over".to_owned());
        }
        if record.abort_requested {
            warnings.push("abort requested".to_owned());
        }
        if record.finalizing.is_some() {
            warnings.push("finalizing".to_owned());
        }
        // What the record does not say: escalation, timeouts (a resource past its time or
        // silent past its heartbeat), a lost lease. From memory for a session this server
        // runs; from the end of its log for one another server runs.
        let signals = match app.supervisor.live_signals(record.id) {
            Some(live) => Signals {
                escalated: live.escalated,
                timeouts: live.timeouts as usize,
                silent: live.heartbeat_silences as usize,
                lease_lost: live.lease_lost,
                within: String::new(),
            },
            None => tail_signals(&app, record.id).await?,
        };
        if signals.escalated {
            warnings.push("escalated".to_owned());
        }
        if signals.silent > 0 {
            warnings.push(format!(
                "heartbeat silent ({}{})",
                signals.silent, signals.within
            ));
        }
        if signals.timeouts > 0 {
            warnings.push(format!("timeouts ({}{})", signals.timeouts, signals.within));
        }
        if signals.lease_lost {
            warnings.push("lease lost".to_owned());
        }
        active.push(Active {
            done: record.counts.total(),
            deadline,
            deadline_in_ms,
            warnings,
            record,
        });
    }
    Ok(Json(Now { now, active }))
}
