//! The `SessionStore` contract, written once and generic over the store, so that every store
//! (memory, SQLite and PostgreSQL) passes the same suite: the busy lock, the finalization
//! compare-and-set, and what a claimed or finished session refuses.

mod common;

use std::sync::Arc;
use std::time::Duration;

use harvest_supervisor::store::{
    Claim, Completed, Completion, NewSession, NodeInfo, ProcessId, SessionQuery,
};
use harvest_supervisor::{
    Fence, FinalizeReason, MemoryStore, NodeId, OutcomeCounts, OutcomeRecord, ResourceOutcome,
    SessionConfig, SessionId, SessionStatus, SessionStore, SqliteStore, StoreError,
};

fn new_session(harvester: &str, n: usize) -> NewSession {
    NewSession {
        id: SessionId::new(),
        harvester_id: harvester.into(),
        resources: (0..n).map(|i| format!("r{i}").into()).collect(),
        started: chrono::Utc::now(),
        workflow_time: Duration::from_secs(60),
        config: SessionConfig::default().with_max_concurrency(7).into(),
        owner: OWNER,
    }
}

/// The node every session of the contract is created by.
const OWNER: NodeId = NodeId(uuid::Uuid::from_u128(1));

/// The fence of a session `OWNER` created.
fn f() -> Fence {
    Fence::new(OWNER)
}

fn completion(status: SessionStatus) -> Completion {
    Completion {
        reason: FinalizeReason::Completed,
        status,
        unrecorded: Vec::new(),
        counts: OutcomeCounts::default(),
        finalizer_error: None,
        ended: chrono::Utc::now(),
    }
}

async fn busy_lock_admits_one_of_many_concurrent_creates(store: Arc<dyn SessionStore>) {
    let tasks = (0..100).map(|_| {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.create_session(new_session("csw", 1)).await })
    });
    let results = futures::future::join_all(tasks).await;
    let won = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    let busy = results
        .iter()
        .filter(|r| matches!(r, Ok(Err(StoreError::HarvesterBusy { .. }))))
        .count();
    assert_eq!((won, busy), (1, 99));
}

async fn exactly_one_concurrent_claim_wins(store: Arc<dyn SessionStore>) {
    let record = store
        .create_session(new_session("claims", 2))
        .await
        .expect("create");
    let tasks = (0..50).map(|_| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .claim_finalization(record.id, f(), FinalizeReason::DeadlineExpired)
                .await
        })
    });
    let results = futures::future::join_all(tasks).await;
    let claimed = results
        .iter()
        .filter(|r| matches!(r, Ok(Ok(Claim::Claimed(_)))))
        .count();
    assert_eq!(claimed, 1);
    let after = store.session(record.id).await.expect("record");
    assert_eq!(after.finalizing, Some(FinalizeReason::DeadlineExpired));
    assert!(!after.status.is_terminal(), "a claim alone is not the end");
}

async fn a_claimed_session_refuses_outcomes_and_transitions(store: Arc<dyn SessionStore>) {
    let r = store
        .create_session(new_session("refuse", 2))
        .await
        .expect("create");
    assert!(
        store
            .transition(r.id, f(), SessionStatus::Pending, SessionStatus::OnGoing)
            .await
            .expect("t")
    );
    let ok = OutcomeRecord {
        resource_id: "r0".into(),
        outcome: ResourceOutcome::Succeeded,
        attempts: 1,
        elapsed: Duration::from_secs(1),
    };
    store
        .record_outcome(r.id, f(), ok.clone())
        .await
        .expect("before the claim");
    assert_eq!(store.session(r.id).await.expect("r").counts.succeeded, 1);
    let (page, total) = store.outcomes_page(r.id, 0, 10).await.expect("page");
    assert_eq!((page.len(), total), (1, 1));
    let (page, total) = store
        .outcomes_page(r.id, 1, 10)
        .await
        .expect("past the end");
    assert_eq!((page.len(), total), (0, 1));
    assert!(matches!(
        store.claim_finalization(r.id, f(), FinalizeReason::Aborted).await,
        Ok(Claim::Claimed(before)) if before.status == SessionStatus::OnGoing
    ));
    assert!(matches!(
        store
            .record_outcome(
                r.id,
                f(),
                OutcomeRecord {
                    resource_id: "r1".into(),
                    ..ok
                }
            )
            .await,
        Err(StoreError::Finalizing { .. })
    ));
    assert!(
        !store
            .transition(r.id, f(), SessionStatus::OnGoing, SessionStatus::Aborting)
            .await
            .expect("t")
    );
    assert_eq!(store.outcomes(r.id).await.expect("o").len(), 1);
}

async fn completion_is_once_and_frees_only_its_own_harvester(store: Arc<dyn SessionStore>) {
    let old = store
        .create_session(new_session("free", 1))
        .await
        .expect("create");
    store
        .claim_finalization(old.id, f(), FinalizeReason::Completed)
        .await
        .expect("claim");
    let missing = OutcomeRecord {
        resource_id: "r0".into(),
        outcome: ResourceOutcome::Lost,
        attempts: 0,
        elapsed: Duration::ZERO,
    };
    // Nothing recorded and nothing written with the completion: the store derives the
    // missing outcome from the reason (Completed: lost).
    let mut c = completion(SessionStatus::FinishedAllFailed);
    c.counts.lost = 1;
    assert!(matches!(
        store.complete_finalization(old.id, f(), c.clone()).await,
        Ok(Completed::Now(_))
    ));
    assert_eq!(store.outcomes(old.id).await.expect("o"), vec![missing]);
    assert_eq!(store.active_session(&"free".into()).await.expect("a"), None);

    // A newer session holds the harvester; a stale completion of the old one changes nothing.
    let new = store
        .create_session(new_session("free", 1))
        .await
        .expect("harvester was free");
    assert!(matches!(
        store.complete_finalization(old.id, f(), completion(SessionStatus::FinishedAllOk)).await,
        Ok(Completed::AlreadyFinalized(r)) if r.status == SessionStatus::FinishedAllFailed
    ));
    assert_eq!(
        store.active_session(&"free".into()).await.expect("a"),
        Some(new.id)
    );
    assert!(matches!(
        store
            .claim_finalization(old.id, f(), FinalizeReason::Aborted)
            .await,
        Ok(Claim::AlreadyFinalized(_))
    ));
}

async fn unknown_ids_are_typed_errors(store: Arc<dyn SessionStore>) {
    let ghost = SessionId::new();
    assert!(
        matches!(store.session(ghost).await, Err(StoreError::UnknownSession { session_id }) if session_id == ghost)
    );
    assert!(matches!(
        store
            .claim_finalization(ghost, f(), FinalizeReason::Completed)
            .await,
        Err(StoreError::UnknownSession { .. })
    ));
}

async fn history_and_events_persist_in_order(store: Arc<dyn SessionStore>) {
    let a = store.create_session(new_session("h1", 3)).await.expect("a");
    let b = store.create_session(new_session("h2", 0)).await.expect("b");
    let listed: Vec<SessionId> = store
        .list_sessions()
        .await
        .expect("list")
        .iter()
        .map(|r| r.id)
        .filter(|id| *id == a.id || *id == b.id)
        .collect();
    assert_eq!(listed, vec![b.id, a.id], "newest first");
    let resources = store.resources(a.id).await.expect("resources");
    assert_eq!(resources, ["r0", "r1", "r2"]);
    assert_eq!(a.total, 3);
    let config = store
        .session_config(a.id)
        .await
        .expect("config")
        .expect("kept");
    assert_eq!(config.max_concurrency, 7);
    assert_eq!(a.status, SessionStatus::Pending);
    assert_eq!(a.workflow_time, Duration::from_secs(60));
}

async fn resume_keeps_successes_and_returns_the_rest(store: Arc<dyn SessionStore>) {
    let r = store
        .create_session(new_session("resume", 4))
        .await
        .expect("create");
    store
        .transition(r.id, f(), SessionStatus::Pending, SessionStatus::OnGoing)
        .await
        .expect("t");
    let outcome = |id: &str, outcome| OutcomeRecord {
        resource_id: id.into(),
        outcome,
        attempts: 1,
        elapsed: Duration::from_secs(1),
    };
    store
        .record_outcome(r.id, f(), outcome("r0", ResourceOutcome::Succeeded))
        .await
        .expect("r0");
    store
        .record_outcome(
            r.id,
            f(),
            outcome(
                "r2",
                ResourceOutcome::Failed {
                    error: "500".into(),
                },
            ),
        )
        .await
        .expect("r2");
    store
        .record_outcome(r.id, f(), outcome("r3", ResourceOutcome::Succeeded))
        .await
        .expect("r3");

    let remaining = store
        .resume_session(r.id, f())
        .await
        .expect("resume")
        .expect("resumable");
    assert_eq!(remaining, ["r1", "r2"]);
    let after = store.session(r.id).await.expect("record");
    assert_eq!(after.status, SessionStatus::OnGoing);
    assert_eq!((after.counts.succeeded, after.counts.failed), (2, 0));
    assert_eq!(store.outcomes(r.id).await.expect("outcomes").len(), 2);
    // The forgotten failure can be recorded anew.
    store
        .record_outcome(r.id, f(), outcome("r2", ResourceOutcome::Succeeded))
        .await
        .expect("again");
    assert_eq!(store.outcomes(r.id).await.expect("outcomes").len(), 3);

    // Aborting or claimed sessions are not resumed.
    let a = store
        .create_session(new_session("resume-abort", 1))
        .await
        .expect("create");
    store
        .transition(a.id, f(), SessionStatus::Pending, SessionStatus::Aborting)
        .await
        .expect("t");
    assert_eq!(store.resume_session(a.id, f()).await.expect("answer"), None);
    let c = store
        .create_session(new_session("resume-claim", 1))
        .await
        .expect("create");
    store
        .claim_finalization(c.id, f(), FinalizeReason::Completed)
        .await
        .expect("claim");
    assert_eq!(store.resume_session(c.id, f()).await.expect("answer"), None);
}

async fn history_pages_by_harvester_and_status_newest_first(store: Arc<dyn SessionStore>) {
    let mut csw = Vec::new();
    for _ in 0..5 {
        let r = store
            .create_session(new_session("page-csw", 0))
            .await
            .expect("create");
        store
            .claim_finalization(r.id, f(), FinalizeReason::Completed)
            .await
            .expect("claim");
        store
            .complete_finalization(r.id, f(), completion(SessionStatus::FinishedAllOk))
            .await
            .expect("complete");
        csw.push(r.id);
    }
    let running = store
        .create_session(new_session("page-csw", 0))
        .await
        .expect("create");
    store
        .create_session(new_session("page-wms", 0))
        .await
        .expect("other harvester");
    csw.reverse(); // newest first

    let mut query = SessionQuery {
        harvester_id: Some("page-csw".into()),
        status: Some(SessionStatus::FinishedAllOk),
        limit: 2,
        ..SessionQuery::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = store.query_sessions(&query).await.expect("page");
        assert!(page.sessions.len() <= 2);
        seen.extend(page.sessions.iter().map(|r| r.id));
        match page.next {
            Some(next) => query.before = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, csw, "every finished csw session once, newest first");

    let all_csw = store
        .query_sessions(&SessionQuery {
            harvester_id: Some("page-csw".into()),
            limit: 0,
            ..SessionQuery::default()
        })
        .await
        .expect("page");
    assert_eq!(all_csw.sessions.len(), 1, "limit 0 is read as 1");
    assert_eq!(all_csw.sessions[0].id, running.id);
    assert!(all_csw.next.is_some());
}

/// A store that records outcomes in place keeps `record_outcome`'s rules.
async fn outcomes_recorded_in_place_follow_the_same_rules(store: Arc<dyn SessionStore>) {
    let r = store
        .create_session(new_session("in-place", 2))
        .await
        .expect("create");
    let ok = OutcomeRecord {
        resource_id: "r0".into(),
        outcome: ResourceOutcome::Succeeded,
        attempts: 1,
        elapsed: Duration::from_secs(1),
    };
    let Some(first) = store.record_outcome_now(r.id, f(), &ok) else {
        return; // This store only records outcomes through `record_outcome`.
    };
    first.expect("before the claim");
    assert_eq!(store.session(r.id).await.expect("r").counts.succeeded, 1);
    assert_eq!(
        store.outcomes(r.id).await.expect("o"),
        std::slice::from_ref(&ok)
    );
    assert!(matches!(
        store.record_outcome_now(SessionId::new(), f(), &ok),
        Some(Err(StoreError::UnknownSession { .. }))
    ));
    assert!(matches!(
        store
            .claim_finalization(r.id, f(), FinalizeReason::Aborted)
            .await,
        Ok(Claim::Claimed(_))
    ));
    let late = OutcomeRecord {
        resource_id: "r1".into(),
        ..ok
    };
    assert!(matches!(
        store.record_outcome_now(r.id, f(), &late),
        Some(Err(StoreError::Finalizing { .. }))
    ));
    assert_eq!(store.outcomes(r.id).await.expect("o").len(), 1);
}

/// Every kind of outcome, however the store keeps it, reads back as recorded and in order.
async fn every_kind_of_outcome_reads_back_as_recorded(store: Arc<dyn SessionStore>) {
    let r = store
        .create_session(new_session("kinds", 6))
        .await
        .expect("create");
    let kinds = [
        ResourceOutcome::Succeeded,
        ResourceOutcome::Failed {
            error: "remote said 500".into(),
        },
        ResourceOutcome::Panicked {
            message: "parser exploded".into(),
        },
        ResourceOutcome::TimedOut,
        ResourceOutcome::Cancelled,
        ResourceOutcome::Lost,
    ];
    let recorded: Vec<OutcomeRecord> = (0u32..)
        .zip(kinds)
        .map(|(i, outcome)| OutcomeRecord {
            resource_id: format!("r{i}").into(),
            outcome,
            attempts: i + 1,
            elapsed: Duration::new(u64::from(i), 7 * i + 1),
        })
        .collect();
    for (i, record) in recorded.iter().enumerate() {
        // Half through each way in, where the store has both.
        let in_place = if i % 2 == 0 {
            store.record_outcome_now(r.id, f(), record)
        } else {
            None
        };
        match in_place {
            Some(result) => result.expect("recorded in place"),
            None => store
                .record_outcome(r.id, f(), record.clone())
                .await
                .expect("recorded"),
        }
    }
    assert_eq!(store.outcomes(r.id).await.expect("outcomes"), recorded);
    let (page, total) = store.outcomes_page(r.id, 1, 3).await.expect("page");
    assert_eq!((page.as_slice(), total), (&recorded[1..4], 6));
}

/// Finalization's second durable step counts the finalizer's runs of a claimed session,
/// and nothing else.
async fn finalizer_starts_are_counted_only_between_claim_and_completion(
    store: Arc<dyn SessionStore>,
) {
    let r = store
        .create_session(new_session("starts", 1))
        .await
        .expect("create");
    assert!(matches!(
        store.finalizer_started(r.id, f()).await,
        Err(StoreError::NotClaimed { session_id }) if session_id == r.id
    ));
    assert!(matches!(
        store.finalizer_started(SessionId::new(), f()).await,
        Err(StoreError::UnknownSession { .. })
    ));
    assert_eq!(store.session(r.id).await.expect("r").finalizer_attempts, 0);
    store
        .claim_finalization(r.id, f(), FinalizeReason::Completed)
        .await
        .expect("claim");
    assert_eq!(store.finalizer_started(r.id, f()).await.expect("first"), 1);
    assert_eq!(
        store.finalizer_started(r.id, f()).await.expect("a re-run"),
        2
    );
    // A claim seen by a later reader (recovery) says how many runs started.
    assert!(matches!(
        store.claim_finalization(r.id, f(), FinalizeReason::Interrupted).await,
        Ok(Claim::AlreadyClaimed(now)) if now.finalizer_attempts == 2
    ));
    store
        .complete_finalization(r.id, f(), completion(SessionStatus::FinishedAllOk))
        .await
        .expect("complete");
    assert!(matches!(
        store.finalizer_started(r.id, f()).await,
        Err(StoreError::NotClaimed { .. })
    ));
    assert_eq!(store.session(r.id).await.expect("r").finalizer_attempts, 2);
}

/// A terminal session has one outcome per resource without a row per missing one: what
/// was recorded, what the completion brought, and the rest derived from the reason.
async fn a_terminal_session_derives_the_outcomes_it_never_recorded(store: Arc<dyn SessionStore>) {
    let r = store
        .create_session(new_session("derive", 6))
        .await
        .expect("create");
    let outcome = |id: &str, outcome| OutcomeRecord {
        resource_id: id.into(),
        outcome,
        attempts: 2,
        elapsed: Duration::from_secs(3),
    };
    let ok = |id: &str| outcome(id, ResourceOutcome::Succeeded);
    store.record_outcome(r.id, f(), ok("r4")).await.expect("r4");
    store.record_outcome(r.id, f(), ok("r1")).await.expect("r1");
    // Not derived before the end.
    assert_eq!(store.outcomes(r.id).await.expect("o").len(), 2);
    assert_eq!(store.outcomes_page(r.id, 0, 10).await.expect("p").1, 2);
    store
        .claim_finalization(r.id, f(), FinalizeReason::DeadlineExpired)
        .await
        .expect("claim");
    let mut c = completion(SessionStatus::FinishedSomeFailed);
    c.reason = FinalizeReason::DeadlineExpired;
    // The session saw r2 fail, but the store missed it: written with the completion.
    c.unrecorded = vec![outcome(
        "r2",
        ResourceOutcome::Failed {
            error: "500".into(),
        },
    )];
    c.counts = OutcomeCounts {
        succeeded: 2,
        failed: 1,
        timed_out: 3,
        ..OutcomeCounts::default()
    };
    store
        .complete_finalization(r.id, f(), c)
        .await
        .expect("complete");
    let timed_out = |id: &str| OutcomeRecord {
        resource_id: id.into(),
        outcome: ResourceOutcome::TimedOut,
        attempts: 0,
        elapsed: Duration::ZERO,
    };
    let expected = vec![
        ok("r4"),
        ok("r1"),
        outcome(
            "r2",
            ResourceOutcome::Failed {
                error: "500".into(),
            },
        ),
        timed_out("r0"),
        timed_out("r3"),
        timed_out("r5"),
    ];
    assert_eq!(store.outcomes(r.id).await.expect("o"), expected);
    for (offset, limit) in [(0, 2), (1, 3), (2, 2), (4, 10), (6, 5), (0, 100)] {
        let (page, total) = store
            .outcomes_page(r.id, offset, limit)
            .await
            .expect("page");
        let end = (offset + limit).min(expected.len());
        assert_eq!(page, expected[offset.min(end)..end], "{offset}+{limit}");
        assert_eq!(total, 6);
    }
    let after = store.session(r.id).await.expect("record");
    assert_eq!(after.counts.total(), 6);

    // An abort derives cancellations.
    let a = store
        .create_session(new_session("derive-abort", 2))
        .await
        .expect("create");
    store
        .claim_finalization(a.id, f(), FinalizeReason::Aborted)
        .await
        .expect("claim");
    let mut c = completion(SessionStatus::Aborted);
    c.reason = FinalizeReason::Aborted;
    store
        .complete_finalization(a.id, f(), c)
        .await
        .expect("complete");
    let kinds: Vec<ResourceOutcome> = store
        .outcomes(a.id)
        .await
        .expect("o")
        .into_iter()
        .map(|o| o.outcome)
        .collect();
    assert_eq!(
        kinds,
        [ResourceOutcome::Cancelled, ResourceOutcome::Cancelled]
    );
}

/// A log is read page by page, in `seq` order, each event once.
async fn event_logs_page_in_seq_order(store: Arc<dyn SessionStore>) {
    let r = store
        .create_session(new_session("pages", 0))
        .await
        .expect("create");
    for seq in 1..=10 {
        store
            .append_event(
                f(),
                harvest_supervisor::SessionEvent {
                    seq,
                    at: chrono::Utc::now(),
                    session_id: r.id,
                    harvester_id: "pages".into(),
                    kind: harvest_supervisor::EventKind::MonitorTick {
                        remaining: Duration::from_secs(seq),
                    },
                },
            )
            .expect("append");
    }
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store.events_after(r.id, after, 3).await.expect("page");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = last.seq;
        seen.extend(page.iter().map(|e| e.seq));
    }
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    assert_eq!(
        store.events_after(r.id, 4, 0).await.expect("page").len(),
        1,
        "limit 0 reads as 1"
    );
    assert_eq!(store.events(r.id).await.expect("all").len(), 10);
    assert!(matches!(
        store.events_after(SessionId::new(), 0, 3).await,
        Err(StoreError::UnknownSession { .. })
    ));
}

fn node() -> NodeInfo {
    NodeInfo {
        id: NodeId::new(),
        name: Some("contract".into()),
        process: None,
    }
}

const LONG: Duration = Duration::from_secs(600);

async fn writes_with_a_stale_fence_are_refused_and_change_nothing(store: Arc<dyn SessionStore>) {
    let r = store
        .create_session(new_session("fenced", 2))
        .await
        .expect("create");
    assert_eq!(r.fence(), Some(f()), "created in epoch 1 by its creator");
    let ok = OutcomeRecord {
        resource_id: "r0".into(),
        outcome: ResourceOutcome::Succeeded,
        attempts: 1,
        elapsed: Duration::from_secs(1),
    };
    let another_node = Fence {
        node: NodeId::new(),
        epoch: 1,
    };
    let an_old_epoch = Fence {
        node: OWNER,
        epoch: 0,
    };
    for stale in [another_node, an_old_epoch] {
        let fenced = |e: &StoreError| {
            matches!(e, StoreError::Fenced { session_id, fence, holder }
                if *session_id == r.id && *fence == stale && *holder == Some(f()))
        };
        let t = store
            .transition(r.id, stale, SessionStatus::Pending, SessionStatus::OnGoing)
            .await;
        assert!(t.as_ref().is_err_and(fenced), "{t:?}");
        let o = store.record_outcome(r.id, stale, ok.clone()).await;
        assert!(o.as_ref().is_err_and(fenced), "{o:?}");
        if let Some(o) = store.record_outcome_now(r.id, stale, &ok) {
            assert!(o.as_ref().is_err_and(fenced), "{o:?}");
        }
        if let Some(receipt) = store.queue_outcome(r.id, stale, &ok) {
            let o = receipt.answer().await;
            assert!(o.as_ref().is_err_and(fenced), "{o:?}");
        }
        let c = store
            .claim_finalization(r.id, stale, FinalizeReason::Completed)
            .await;
        assert!(c.as_ref().is_err_and(fenced), "{c:?}");
        let s = store.finalizer_started(r.id, stale).await;
        assert!(s.as_ref().is_err_and(fenced), "{s:?}");
        let m = store.resume_session(r.id, stale).await;
        assert!(m.as_ref().is_err_and(fenced), "{m:?}");
        let d = store
            .complete_finalization(r.id, stale, completion(SessionStatus::FinishedAllOk))
            .await;
        assert!(d.as_ref().is_err_and(fenced), "{d:?}");
        let event = harvest_supervisor::SessionEvent {
            seq: 1,
            at: chrono::Utc::now(),
            session_id: r.id,
            harvester_id: "fenced".into(),
            kind: harvest_supervisor::EventKind::AbortRequested,
        };
        // A store that writes in place says so; a queueing one drops it.
        if let Err(e) = store.append_event(stale, event) {
            assert!(fenced(&e), "{e}");
        }
    }
    store.flush().await.expect("flush");
    assert_eq!(
        store.session(r.id).await.expect("record"),
        r,
        "nothing changed"
    );
    assert!(store.events(r.id).await.expect("events").is_empty());
    assert!(store.outcomes(r.id).await.expect("outcomes").is_empty());
    // The holder's own writes still pass.
    store
        .record_outcome(r.id, f(), ok)
        .await
        .expect("the owner writes");
}

async fn a_rescue_takes_over_only_sessions_of_nodes_whose_lease_expired(
    store: Arc<dyn SessionStore>,
) {
    let (a, b, c) = (node(), node(), node());
    for n in [&a, &b, &c] {
        let record = store.register_node(n, LONG).await.expect("register");
        assert!(record.live);
        assert_eq!(record.info, *n);
    }
    let of = |owner: NodeId, harvester: &str| NewSession {
        owner,
        ..new_session(harvester, 1)
    };
    let live = store.create_session(of(a.id, "live")).await.expect("a's");
    let dead_node = NodeId::new(); // never registered: as good as expired
    let orphan = store
        .create_session(of(dead_node, "orphan"))
        .await
        .expect("the dead node's");
    let done = store
        .create_session(of(dead_node, "done"))
        .await
        .expect("done");
    let done_fence = done.fence().expect("owned");
    store
        .claim_finalization(done.id, done_fence, FinalizeReason::Completed)
        .await
        .expect("claim");
    store
        .complete_finalization(
            done.id,
            done_fence,
            completion(SessionStatus::FinishedAllOk),
        )
        .await
        .expect("complete");

    let taken = store.take_over(b.id, 100).await.expect("rescue");
    assert_eq!(taken.len(), 1, "only the dead node's unfinished session");
    assert_eq!(taken[0].record.id, orphan.id);
    assert_eq!(taken[0].from_node, Some(dead_node));
    let fence = Fence {
        node: b.id,
        epoch: 2,
    };
    assert_eq!(taken[0].record.fence(), Some(fence));
    assert!(store.take_over(c.id, 100).await.expect("again").is_empty());
    // The old owner is fenced off; the new one writes.
    assert!(matches!(
        store
            .claim_finalization(
                orphan.id,
                orphan.fence().expect("old"),
                FinalizeReason::Completed
            )
            .await,
        Err(StoreError::Fenced { .. })
    ));
    assert!(matches!(
        store
            .claim_finalization(orphan.id, fence, FinalizeReason::Interrupted)
            .await,
        Ok(Claim::Claimed(_))
    ));

    // A released node's sessions go at the next rescue, to one rescuer.
    store.release_node(a.id).await.expect("release");
    let a_now = store.nodes().await.expect("nodes");
    assert!(a_now.iter().any(|n| n.info.id == a.id && !n.live));
    let (one, two) = tokio::join!(store.take_over(b.id, 100), store.take_over(c.id, 100));
    let mut won: Vec<_> = one.expect("b").into_iter().chain(two.expect("c")).collect();
    assert_eq!(won.len(), 1);
    let won = won.pop().expect("one");
    assert_eq!((won.record.id, won.from_node), (live.id, Some(a.id)));
    assert_eq!(won.record.epoch, 2);
    // A renewal after expiry keeps the node alive, but not what was taken.
    let renewed = store.renew_lease(&a, LONG).await.expect("renew");
    assert!(renewed.live && renewed.lease_until > chrono::Utc::now());
    assert!(matches!(
        store
            .transition(
                live.id,
                live.fence().expect("a's"),
                SessionStatus::Pending,
                SessionStatus::OnGoing
            )
            .await,
        Err(StoreError::Fenced { .. })
    ));
    // Who holds what, as a node checks it against the sessions it runs.
    for n in [b.id, c.id] {
        let mut held = Vec::new();
        for id in [orphan.id, live.id] {
            if store.session(id).await.expect("record").owner == Some(n) {
                held.push(id);
            }
        }
        let mut open = store.open_sessions_of(n).await.expect("open");
        open.sort();
        held.sort();
        assert_eq!(open, held);
    }
    assert!(store.open_sessions_of(a.id).await.expect("a's").is_empty());
    assert!(
        store
            .open_sessions_of(dead_node)
            .await
            .expect("gone")
            .is_empty()
    );
    // A rescuer without a running lease takes nothing.
    assert!(matches!(
        store.take_over(NodeId::new(), 100).await,
        Err(StoreError::LeaseExpired { .. })
    ));
}

async fn many_rescuers_take_each_orphan_exactly_once(store: Arc<dyn SessionStore>) {
    let dead = NodeId::new();
    for i in 0..40 {
        store
            .create_session(NewSession {
                owner: dead,
                ..new_session(&format!("h{i}"), 1)
            })
            .await
            .expect("create");
    }
    let mut rescuers = Vec::new();
    for _ in 0..8 {
        let n = node();
        store.register_node(&n, LONG).await.expect("register");
        rescuers.push(n.id);
    }
    // Small batches, so that the rescuers interleave.
    let tasks = rescuers.iter().map(|&id| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let taken = store.take_over(id, 3).await.expect("rescue");
                if taken.is_empty() {
                    return mine;
                }
                mine.extend(taken.into_iter().map(|t| t.record.id));
            }
        })
    });
    let all: Vec<SessionId> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.expect("task"))
        .collect();
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (40, 40));
}

async fn a_node_whose_process_is_gone_can_be_expired_at_once(store: Arc<dyn SessionStore>) {
    let process = ProcessId {
        host: "host-key".into(),
        pid: 4242,
        start: 17,
    };
    let n = NodeInfo {
        process: Some(process.clone()),
        ..node()
    };
    store.register_node(&n, LONG).await.expect("register");
    let reused = ProcessId {
        start: 18,
        ..process.clone()
    };
    assert!(
        !store
            .expire_node(n.id, &reused)
            .await
            .expect("not that process")
    );
    assert!(store.nodes().await.expect("nodes")[0].live);
    assert!(store.expire_node(n.id, &process).await.expect("expire"));
    let nodes = store.nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert!(!nodes[0].live);
    assert_eq!(nodes[0].info, n);
    assert!(!store.expire_node(n.id, &process).await.expect("once"));
}

async fn an_abort_from_another_node_is_recorded_for_the_owner_to_honour(
    store: Arc<dyn SessionStore>,
) {
    let r = store
        .create_session(new_session("remote", 1))
        .await
        .expect("create");
    assert!(!r.abort_requested);
    assert!(
        store
            .requested_aborts(OWNER)
            .await
            .expect("none")
            .is_empty()
    );
    let after = store.request_abort(r.id).await.expect("request");
    assert!(after.abort_requested);
    assert_eq!(store.requested_aborts(OWNER).await.expect("one"), [r.id]);
    assert!(
        store
            .requested_aborts(NodeId::new())
            .await
            .expect("another node's")
            .is_empty()
    );
    // Honoured (the owner moved it to aborting): no longer asked for.
    assert!(
        store
            .transition(r.id, f(), SessionStatus::Pending, SessionStatus::Aborting)
            .await
            .expect("abort")
    );
    assert!(
        store
            .requested_aborts(OWNER)
            .await
            .expect("none")
            .is_empty()
    );
    // A claimed or finished session takes no request.
    let c = store
        .create_session(new_session("remote-claimed", 1))
        .await
        .expect("create");
    store
        .claim_finalization(c.id, f(), FinalizeReason::Completed)
        .await
        .expect("claim");
    assert!(
        !store
            .request_abort(c.id)
            .await
            .expect("answer")
            .abort_requested
    );
    assert!(
        store
            .requested_aborts(OWNER)
            .await
            .expect("none")
            .is_empty()
    );
    assert!(matches!(
        store.request_abort(SessionId::new()).await,
        Err(StoreError::UnknownSession { .. })
    ));
}

/// The history an adaptive budget learns from: the durations of a harvester's successes,
/// newest session first and latest recorded first within one, bounded by the limit; no
/// failure, no other harvester's.
async fn recent_durations_are_the_newest_successes_of_one_harvester(store: Arc<dyn SessionStore>) {
    let ms = Duration::from_millis;
    let outcome = |i: usize, outcome: ResourceOutcome, elapsed: Duration| OutcomeRecord {
        resource_id: format!("r{i}").into(),
        outcome,
        attempts: 1,
        elapsed,
    };
    let h = "learn".into();
    assert_eq!(store.recent_durations(&h, 100).await.expect("none"), vec![]);
    // Two finished sessions and a running one, each with successes and other outcomes.
    let plans: [Vec<OutcomeRecord>; 3] = [
        vec![
            outcome(0, ResourceOutcome::Succeeded, ms(1)),
            outcome(1, ResourceOutcome::Failed { error: "no".into() }, ms(100)),
            outcome(2, ResourceOutcome::Succeeded, ms(2)),
            outcome(3, ResourceOutcome::Succeeded, ms(3)),
        ],
        vec![
            outcome(0, ResourceOutcome::TimedOut, ms(200)),
            outcome(1, ResourceOutcome::Succeeded, ms(4)),
            outcome(2, ResourceOutcome::Succeeded, Duration::new(5, 5)),
        ],
        vec![outcome(0, ResourceOutcome::Succeeded, ms(6))],
    ];
    let last = plans.len() - 1;
    for (n, plan) in plans.into_iter().enumerate() {
        let r = store
            .create_session(new_session("learn", plan.len() + 1))
            .await
            .expect("create");
        for o in plan {
            store.record_outcome(r.id, f(), o).await.expect("recorded");
        }
        if n < last {
            store
                .claim_finalization(r.id, f(), FinalizeReason::Completed)
                .await
                .expect("claim");
            store
                .complete_finalization(r.id, f(), completion(SessionStatus::FinishedSomeFailed))
                .await
                .expect("complete");
        }
    }
    let other = store
        .create_session(new_session("other", 1))
        .await
        .expect("other");
    store
        .record_outcome(
            other.id,
            f(),
            outcome(0, ResourceOutcome::Succeeded, ms(999)),
        )
        .await
        .expect("recorded");

    // Newest session first; within one, in no particular order.
    let by_session = |mut found: Vec<Duration>| {
        let n = found.len();
        let (a, rest) = found.split_at_mut(1.min(n));
        let (b, c) = rest.split_at_mut(2.min(rest.len()));
        for part in [&mut *a, &mut *b, &mut *c] {
            part.sort_unstable();
        }
        found
    };
    let all = store.recent_durations(&h, 100).await.expect("history");
    assert_eq!(
        by_session(all),
        vec![ms(6), ms(4), Duration::new(5, 5), ms(1), ms(2), ms(3)],
        "successes only, newest session first"
    );
    let four = by_session(store.recent_durations(&h, 4).await.expect("limited"));
    assert_eq!(four[..3], [ms(6), ms(4), Duration::new(5, 5)]);
    assert!([ms(1), ms(2), ms(3)].contains(&four[3]), "{four:?}");
    assert_eq!(store.recent_durations(&h, 0).await.expect("zero"), vec![]);
    assert_eq!(
        store
            .recent_durations(&"nobody".into(), 10)
            .await
            .expect("unknown"),
        vec![]
    );
}

/// Outcomes a completion could not write, written once the session is terminal: only
/// where none is recorded, once.
async fn late_outcomes_fill_in_only_what_a_terminal_session_is_missing(
    store: Arc<dyn SessionStore>,
) {
    let o = |i: usize, outcome: ResourceOutcome| OutcomeRecord {
        resource_id: format!("r{i}").into(),
        outcome,
        attempts: 2,
        elapsed: Duration::from_millis(7),
    };
    let r = store
        .create_session(new_session("late", 3))
        .await
        .expect("create");
    store
        .record_outcome(r.id, f(), o(0, ResourceOutcome::Succeeded))
        .await
        .expect("recorded");
    let late = vec![
        o(
            0,
            ResourceOutcome::Failed {
                error: "stale".into(),
            },
        ),
        o(1, ResourceOutcome::Succeeded),
        o(
            2,
            ResourceOutcome::Panicked {
                message: "boom".into(),
            },
        ),
        o(2, ResourceOutcome::Succeeded),
    ];
    // An open session's outcomes are its actor's to record.
    assert_eq!(
        store.record_late_outcomes(r.id, &late).await.expect("open"),
        0
    );
    assert_eq!(store.outcomes(r.id).await.expect("o").len(), 1);
    store
        .claim_finalization(r.id, f(), FinalizeReason::Completed)
        .await
        .expect("claim");
    let mut c = completion(SessionStatus::FinishedSomeFailed);
    c.counts.succeeded = 2;
    c.counts.panicked = 1;
    store
        .complete_finalization(r.id, f(), c)
        .await
        .expect("complete");
    // Derived until then.
    let derived = store.outcomes(r.id).await.expect("o");
    assert_eq!(derived[1].outcome, ResourceOutcome::Lost);
    assert_eq!(
        store.record_late_outcomes(r.id, &late).await.expect("late"),
        2
    );
    let now = store.outcomes(r.id).await.expect("o");
    assert_eq!(
        now,
        vec![
            o(0, ResourceOutcome::Succeeded),
            late[1].clone(),
            late[2].clone()
        ]
    );
    assert_eq!(
        store
            .record_late_outcomes(r.id, &late)
            .await
            .expect("again"),
        0,
        "written once"
    );
    assert_eq!(store.outcomes(r.id).await.expect("o"), now);
    let (page, total) = store.outcomes_page(r.id, 1, 5).await.expect("page");
    assert_eq!((page.as_slice(), total), (&now[1..], 3));
    assert!(matches!(
        store
            .record_late_outcomes(SessionId::new(), &[o(0, ResourceOutcome::Lost)])
            .await,
        Err(StoreError::UnknownSession { .. })
    ));
}

async fn contract(make: impl Fn() -> Arc<dyn SessionStore>) {
    late_outcomes_fill_in_only_what_a_terminal_session_is_missing(make()).await;
    recent_durations_are_the_newest_successes_of_one_harvester(make()).await;
    an_abort_from_another_node_is_recorded_for_the_owner_to_honour(make()).await;
    writes_with_a_stale_fence_are_refused_and_change_nothing(make()).await;
    a_rescue_takes_over_only_sessions_of_nodes_whose_lease_expired(make()).await;
    many_rescuers_take_each_orphan_exactly_once(make()).await;
    a_node_whose_process_is_gone_can_be_expired_at_once(make()).await;
    event_logs_page_in_seq_order(make()).await;
    a_terminal_session_derives_the_outcomes_it_never_recorded(make()).await;
    finalizer_starts_are_counted_only_between_claim_and_completion(make()).await;
    every_kind_of_outcome_reads_back_as_recorded(make()).await;
    outcomes_recorded_in_place_follow_the_same_rules(make()).await;
    history_pages_by_harvester_and_status_newest_first(make()).await;
    resume_keeps_successes_and_returns_the_rest(make()).await;
    history_and_events_persist_in_order(make()).await;
    busy_lock_admits_one_of_many_concurrent_creates(make()).await;
    exactly_one_concurrent_claim_wins(make()).await;
    a_claimed_session_refuses_outcomes_and_transitions(make()).await;
    completion_is_once_and_frees_only_its_own_harvester(make()).await;
    unknown_ids_are_typed_errors(make()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_keeps_the_contract() {
    contract(|| Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("temp dir");
    // One fresh file per part of the contract, opened on this runtime as it is asked for.
    let n = std::sync::atomic::AtomicUsize::new(0);
    let handle = tokio::runtime::Handle::current();
    contract(|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = dir.path().join(format!("s{i}.db"));
        let store = tokio::task::block_in_place(|| handle.block_on(SqliteStore::open(path)));
        Arc::new(store.expect("open")) as Arc<dyn SessionStore>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_the_contract() {
    let Some(pg) = common::pg::server("postgres_store_keeps_the_contract") else {
        return;
    };
    // One fresh schema per part of the contract, connected on this runtime when asked for.
    let handle = tokio::runtime::Handle::current();
    contract(|| {
        let store = tokio::task::block_in_place(|| handle.block_on(pg.store()));
        Arc::new(store) as Arc<dyn SessionStore>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_file_share_the_busy_lock_and_the_claim() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("shared.db");
    let one: Arc<dyn SessionStore> = Arc::new(SqliteStore::open(&path).await.expect("one"));
    let two: Arc<dyn SessionStore> = Arc::new(SqliteStore::open(&path).await.expect("two"));
    let record = one
        .create_session(new_session("csw", 1))
        .await
        .expect("create");
    assert!(matches!(
        two.create_session(new_session("csw", 1)).await,
        Err(StoreError::HarvesterBusy { session_id, .. }) if session_id == record.id
    ));
    let (a, b) = tokio::join!(
        one.claim_finalization(record.id, f(), FinalizeReason::Completed),
        two.claim_finalization(record.id, f(), FinalizeReason::DeadlineExpired),
    );
    let won = [a.expect("a"), b.expect("b")]
        .iter()
        .filter(|c| matches!(c, Claim::Claimed(_)))
        .count();
    assert_eq!(won, 1, "one claim across both connections");
}
