//! What only the PostgreSQL store has: connecting (each bad input a typed error naming
//! what), its schema beside the application's (refused when not ours or newer, migrated
//! once by processes starting together), and its announcements (an abort reaches the
//! owning node at once; a follower on another node sees the log as it grows; both survive
//! the loss of the listening connection). The contract every store keeps is in
//! `store_contract.rs`; several processes in `multi_process.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::pg::{PASSWORD, PASSWORD_ROLE, TestPg};
use harvest_supervisor::store::{NewSession, PostgresOptions, PostgresStore, StoreSignal};
use harvest_supervisor::{
    EventKind, FinalizeReason, HarvestContext, NodeId, SessionConfig, SessionId, SessionStatus,
    SessionStore, StoreError, Supervisor, SupervisorConfig, finalizer_fn, harvest_fn,
};

/// A failure guard, not a deadline under test.
const GUARD: Duration = Duration::from_secs(30);

fn server(test: &str) -> Option<&'static TestPg> {
    common::pg::server(test)
}

async fn connect_err(options: PostgresOptions) -> StoreError {
    match PostgresStore::connect_with(options).await {
        Ok(store) => panic!("connected to {store:?}"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_connection_input_is_a_typed_error_naming_what() {
    // Parsing needs no server.
    let e = PostgresOptions::from_url("postgres://u@h:notaport/db").expect_err("bad port");
    assert!(
        matches!(&e, StoreError::InvalidOptions(c) if c.field() == "url"),
        "{e:?}"
    );
    for (options, field) in [
        (
            PostgresOptions::from_url("host=/tmp")
                .expect("url")
                .schema("Bad-Name"),
            "schema",
        ),
        (
            PostgresOptions::from_url("host=/tmp")
                .expect("url")
                .schema("pg_catalog"),
            "schema",
        ),
        (
            PostgresOptions::from_url("host=/tmp")
                .expect("url")
                .pool_size(0),
            "pool_size",
        ),
        (
            PostgresOptions::from_url("host=/tmp")
                .expect("url")
                .commit_delay(Duration::from_secs(5)),
            "commit_delay",
        ),
        (
            PostgresOptions::from_url("host=/tmp")
                .expect("url")
                .lock_timeout(Duration::ZERO),
            "lock_timeout",
        ),
    ] {
        let e = connect_err(options).await;
        assert!(
            matches!(&e, StoreError::InvalidOptions(c) if c.field() == field),
            "{field}: {e:?}"
        );
    }
    // Nobody listens there.
    let e = connect_err(
        PostgresOptions::from_url("host=127.0.0.1 port=1 user=x password=secret-1 dbname=d")
            .expect("url")
            .connect_timeout(Duration::from_secs(5)),
    )
    .await;
    assert!(
        matches!(&e, StoreError::Unreachable { target, .. } if target == "127.0.0.1:1/d"),
        "{e:?}"
    );
    assert!(!format!("{e} {e:?}").contains("secret-1"), "{e}");

    let Some(pg) = server("every_bad_connection_input_is_a_typed_error_naming_what") else {
        return;
    };
    let e = connect_err(
        PostgresOptions::from_url(&format!("{} dbname=no_such_db", pg.url)).expect("url"),
    )
    .await;
    assert!(
        matches!(&e, StoreError::UnknownDatabase { database, .. } if database == "no_such_db"),
        "{e:?}"
    );
    let Some(socket) = pg.socket_dir() else {
        eprintln!("(the wrong-password case needs the cluster these tests start)");
        return;
    };
    let as_role = |password: &str| {
        PostgresOptions::from_url(&format!(
            "host={} user={PASSWORD_ROLE} password={password} dbname=postgres",
            socket.display()
        ))
        .expect("url")
        .schema(common::pg::fresh_schema())
    };
    let e = connect_err(as_role("wrong-secret")).await;
    assert!(
        matches!(&e, StoreError::AuthenticationFailed { user, .. } if user == PASSWORD_ROLE),
        "{e:?}"
    );
    assert!(!format!("{e} {e:?}").contains("wrong-secret"), "{e}");
    let store = PostgresStore::connect_with(as_role(PASSWORD))
        .await
        .expect("the right password");
    assert!(store.list_sessions().await.expect("list").is_empty());
}

/// The tables of `schema`, by name.
fn tables(pg: &TestPg, schema: &str) -> Vec<String> {
    let out = std::process::Command::new("psql")
        .args([
            "-At",
            "-d",
            &pg.url,
            "-c",
            &format!(
                "SELECT table_name FROM information_schema.tables \
                 WHERE table_schema = '{schema}' ORDER BY 1"
            ),
        ])
        .output()
        .expect("psql");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_that_is_not_ours_or_is_newer_is_refused_and_left_untouched() {
    let Some(pg) = server("a_schema_that_is_not_ours_or_is_newer_is_refused_and_left_untouched")
    else {
        return;
    };
    // Another application's table of one of our names.
    let foreign = common::pg::fresh_schema();
    pg.psql(&format!(
        "CREATE SCHEMA {foreign}; CREATE TABLE {foreign}.sessions (x int); \
         INSERT INTO {foreign}.sessions VALUES (7)"
    ));
    let e = connect_err(
        PostgresOptions::from_url(&pg.url)
            .expect("url")
            .schema(foreign.as_str()),
    )
    .await;
    assert!(
        matches!(&e, StoreError::ForeignSchema { schema, table, .. }
            if *schema == foreign && table == "sessions"),
        "{e:?}"
    );
    assert_eq!(tables(pg, &foreign), ["sessions"], "nothing was created");

    // Our mark, someone else's name in it.
    let marked = common::pg::fresh_schema();
    pg.psql(&format!(
        "CREATE SCHEMA {marked}; \
         CREATE TABLE {marked}.harvest_supervisor_schema (application text, version bigint); \
         INSERT INTO {marked}.harvest_supervisor_schema VALUES ('another-app', 1)"
    ));
    let e = connect_err(
        PostgresOptions::from_url(&pg.url)
            .expect("url")
            .schema(marked.as_str()),
    )
    .await;
    assert!(matches!(e, StoreError::ForeignSchema { .. }), "{e:?}");
    assert_eq!(tables(pg, &marked), ["harvest_supervisor_schema"]);

    // Ours, written by a newer version.
    let newer = common::pg::fresh_schema();
    let options = PostgresOptions::from_url(&pg.url)
        .expect("url")
        .schema(newer.as_str());
    let store = PostgresStore::connect_with(options.clone())
        .await
        .expect("create");
    store.close().await;
    let before = tables(pg, &newer);
    pg.psql(&format!(
        "UPDATE {newer}.harvest_supervisor_schema SET version = 99"
    ));
    let e = connect_err(options).await;
    assert!(
        matches!(&e, StoreError::DatabaseSchemaTooNew { found: 99, supported, .. } if *supported < 99),
        "{e:?}"
    );
    assert_eq!(tables(pg, &newer), before);
    assert!(e.to_string().contains(&newer), "{e}");

    // Beside the application's own tables: they are left alone.
    let shared = common::pg::fresh_schema();
    pg.psql(&format!(
        "CREATE SCHEMA {shared}; CREATE TABLE {shared}.geonode_layers (id int)"
    ));
    PostgresStore::connect_with(
        PostgresOptions::from_url(&pg.url)
            .expect("url")
            .schema(shared.as_str()),
    )
    .await
    .expect("beside other tables");
    assert!(tables(pg, &shared).contains(&"geonode_layers".to_owned()));
    assert!(tables(pg, &shared).contains(&"sessions".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_together_migrate_once_and_share_what_is_stored() {
    let Some(pg) = server("processes_starting_together_migrate_once_and_share_what_is_stored")
    else {
        return;
    };
    let options = pg.options();
    let stores =
        futures::future::join_all((0..8).map(|_| PostgresStore::connect_with(options.clone())))
            .await;
    let stores: Vec<PostgresStore> = stores
        .into_iter()
        .map(|s| s.expect("every one connects"))
        .collect();
    let record = stores[0]
        .create_session(NewSession {
            id: SessionId::new(),
            harvester_id: "csw".into(),
            resources: vec!["a".into(), "b".into()].into(),
            started: chrono::Utc::now(),
            workflow_time: Duration::from_secs(60),
            config: SessionConfig::default().into(),
            owner: NodeId::new(),
        })
        .await
        .expect("create");
    for store in &stores[1..] {
        assert_eq!(store.session(record.id).await.expect("seen"), record);
    }
    // Reconnecting to a schema at this version changes nothing.
    let again = PostgresStore::connect_with(options).await.expect("again");
    assert_eq!(again.list_sessions().await.expect("list"), [record]);
}

/// A node whose lease is renewed only every 10 minutes: anything it does sooner, it did
/// because it heard of it.
fn slow_renewing(name: &str) -> SupervisorConfig {
    SupervisorConfig::default()
        .with_session(SessionConfig::default().with_max_concurrency(2))
        .with_node_name(Some(name.to_owned()))
        .with_lease_ttl(Duration::from_secs(1800))
        .with_lease_renew_interval(Duration::from_secs(600))
}

/// Resources that wait for their cancellation (or take `takes` when not cancelled).
fn harvest_taking(takes: Duration) -> impl harvest_supervisor::ResourceHarvester {
    harvest_fn(move |ctx: HarvestContext| async move {
        tokio::select! {
            () = tokio::time::sleep(takes) => Ok(()),
            () = ctx.cancel.cancelled() => Err("cancelled".into()),
        }
    })
}

async fn node(
    options: &PostgresOptions,
    name: &str,
    takes: Duration,
) -> (Supervisor, Arc<PostgresStore>) {
    let store = Arc::new(
        PostgresStore::connect_with(options.clone())
            .await
            .expect("connect"),
    );
    let sup = Supervisor::builder(harvest_taking(takes), finalizer_fn(|_| async { Ok(()) }))
        .store(Arc::clone(&store) as Arc<dyn SessionStore>)
        .config(slow_renewing(name))
        .start()
        .await
        .expect("start");
    (sup, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_from_another_node_reaches_the_owner_at_once() {
    let Some(pg) = server("an_abort_from_another_node_reaches_the_owner_at_once") else {
        return;
    };
    let options = pg.options();
    let (a, _) = node(&options, "A", Duration::from_secs(3600)).await;
    let (b, _) = node(&options, "B", Duration::from_secs(3600)).await;
    let id = a
        .start_session("csw", ["r1", "r2", "r3"])
        .await
        .expect("A starts");
    b.abort(id).await.expect("B asks");
    // Without the announcement A would hear of it at its next renewal, in 10 minutes.
    let record = tokio::time::timeout(GUARD, b.wait_finished(id))
        .await
        .expect("aborted long before A's next renewal")
        .expect("record");
    assert_eq!(record.status, SessionStatus::Aborted);
    assert_eq!(record.reason(), Some(FinalizeReason::Aborted));
    assert_eq!(record.owner, Some(a.node_id()), "aborted by its owner");
    a.shutdown().await.expect("a");
    b.shutdown().await.expect("b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_on_another_node_sees_the_whole_log_as_it_grows() {
    let Some(pg) = server("a_follower_on_another_node_sees_the_whole_log_as_it_grows") else {
        return;
    };
    let options = pg.options();
    let (a, store) = node(&options, "A", Duration::from_millis(30)).await;
    let (b, _) = node(&options, "B", Duration::from_millis(30)).await;
    let resources: Vec<String> = (0..40).map(|i| format!("r{i}")).collect();
    let id = a.start_session("csw", resources).await.expect("A starts");
    let mut follower = b.follow(id, 0);
    let mut seen = Vec::new();
    let followed = tokio::time::timeout(GUARD, async {
        while let Some(event) = follower.next().await {
            seen.push(event.expect("an event"));
        }
    })
    .await;
    assert!(followed.is_ok(), "the follower ended with the log");
    let stored = store.events(id).await.expect("events");
    assert_eq!(seen, stored, "every event, in order, once");
    assert!(matches!(
        seen.last().map(|e| &e.kind),
        Some(EventKind::SessionFinished { .. })
    ));
    // A follower of a finished session replays it and ends.
    let mut late = b.follow(id, seen[seen.len() / 2].seq);
    let mut rest = Vec::new();
    while let Some(event) = late.next().await {
        rest.push(event.expect("an event"));
    }
    assert_eq!(rest, stored[stored.len() / 2 + 1..]);
    // Unknown sessions are an error, not an empty log.
    let mut unknown = b.follow(SessionId::new(), 0);
    assert!(matches!(
        unknown.next().await,
        Some(Err(harvest_supervisor::SessionError::UnknownSession { .. }))
    ));
    a.shutdown().await.expect("a");
    b.shutdown().await.expect("b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_resume_after_the_listening_connection_is_killed() {
    let Some(pg) = server("announcements_resume_after_the_listening_connection_is_killed") else {
        return;
    };
    // An application name of its own, so that only this test's connections are killed.
    let app = format!("listener-test-{}", std::process::id());
    let options = PostgresOptions::from_url(&format!("{} application_name={app}", pg.url))
        .expect("url")
        .schema(common::pg::fresh_schema());
    let (a, _) = node(&options, "A", Duration::from_secs(3600)).await;
    let (b, b_store) = node(&options, "B", Duration::from_secs(3600)).await;
    let mut signals = b_store.signals().expect("announcements");
    tokio::time::timeout(GUARD, signals.live.wait_for(|live| *live))
        .await
        .expect("listening")
        .expect("live");
    // Kill every listening connection of this test (A's and B's).
    pg.psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = '{app}' AND query LIKE 'LISTEN%'"
    ));
    tokio::time::timeout(GUARD, signals.live.wait_for(|live| !*live))
        .await
        .expect("noticed")
        .expect("live");
    tokio::time::timeout(GUARD, signals.live.wait_for(|live| *live))
        .await
        .expect("reconnected")
        .expect("live");
    // A's listener is back too (or comes back and looks): the abort still reaches A.
    let id = a
        .start_session("csw", ["r1", "r2"])
        .await
        .expect("A starts");
    b.abort(id).await.expect("B asks");
    let record = tokio::time::timeout(GUARD, b.wait_finished(id))
        .await
        .expect("aborted long before A's next renewal")
        .expect("record");
    assert_eq!(record.status, SessionStatus::Aborted);
    // And B heard the session's events.
    let mut heard = false;
    while let Ok(signal) = signals.receiver.try_recv() {
        heard |= signal == StoreSignal::Events(id);
    }
    assert!(heard, "B was told of the session's events");
    a.shutdown().await.expect("a");
    b.shutdown().await.expect("b");
}

/// Env of [`crashing_node`]: the database URL, the store's schema and the application's
/// table the finalizer writes to.
const CRASH_URL: &str = "HARVEST_PGT_URL";
const CRASH_SCHEMA: &str = "HARVEST_PGT_SCHEMA";
const CRASH_TABLE: &str = "HARVEST_PGT_TABLE";

/// Writes a row for the session into the application's table, in the completing
/// transaction; with `crash`, SIGKILLs its own process right after (before the commit).
struct MarkHarvested {
    table: String,
    crash: bool,
}

#[async_trait::async_trait]
impl harvest_supervisor::store::postgres::TransactionalFinalizer for MarkHarvested {
    async fn finalize(
        &self,
        report: &harvest_supervisor::SessionReport,
        tx: &harvest_supervisor::store::postgres::tokio_postgres::Transaction<'_>,
    ) -> Result<(), harvest_supervisor::BoxError> {
        tx.execute(
            &format!(
                "INSERT INTO {} (session_id, status, attempt) VALUES ($1, $2, $3)",
                self.table
            ),
            &[
                &report.session_id.0,
                &report.status.to_string(),
                &i64::from(report.finalizer_attempt),
            ],
        )
        .await?;
        if self.crash {
            let me = std::process::id().to_string();
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &me])
                .status();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// Run again as a child by the transactional-finalizer test: harvests a session and dies
/// inside its finalizer's transaction. Does nothing in a normal run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_node() {
    let (Ok(url), Ok(schema), Ok(table)) = (
        std::env::var(CRASH_URL),
        std::env::var(CRASH_SCHEMA),
        std::env::var(CRASH_TABLE),
    ) else {
        return;
    };
    let store =
        PostgresStore::connect_with(PostgresOptions::from_url(&url).expect("url").schema(schema))
            .await
            .expect("connect");
    let sup = Supervisor::builder(
        harvest_fn(|_ctx: HarvestContext| async { Ok(()) }),
        harvest_supervisor::store::postgres::PostgresFinalizer::new(MarkHarvested {
            table,
            crash: true,
        }),
    )
    .store(Arc::new(store))
    .start()
    .await
    .expect("start");
    let id = sup
        .start_session("csw", ["a", "b", "c"])
        .await
        .expect("start");
    println!("SESSION {id}");
    let _ = sup.wait_finished(id).await;
    unreachable!("the finalizer kills this process");
}

/// Rows of the application's table for `id`.
fn app_rows(pg: &TestPg, table: &str, id: SessionId) -> Vec<String> {
    let out = std::process::Command::new("psql")
        .args([
            "-At",
            "-d",
            &pg.url,
            "-c",
            &format!("SELECT status || ' ' || attempt FROM {table} WHERE session_id = '{id}'"),
        ])
        .output()
        .expect("psql");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_finalizer_commits_with_the_terminal_status_or_not_at_all() {
    let test = "a_transactional_finalizer_commits_with_the_terminal_status_or_not_at_all";
    let Some(pg) = server(test) else {
        return;
    };
    let schema = common::pg::fresh_schema();
    let table = format!("{schema}_app_harvests");
    pg.psql(&format!(
        "CREATE TABLE {table} (session_id uuid NOT NULL, status text NOT NULL, attempt bigint)"
    ));
    // A node harvests and is SIGKILLed inside its finalizer, its row written, not committed.
    let child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "crashing_node",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CRASH_URL, &pg.url)
        .env(CRASH_SCHEMA, &schema)
        .env(CRASH_TABLE, &table)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(GUARD, child)
        .await
        .expect("the node dies")
        .expect("ran");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9), "killed inside its finalizer");
    let said = String::from_utf8_lossy(&out.stdout);
    let id = said
        .split_whitespace()
        .skip_while(|w| *w != "SESSION")
        .nth(1)
        .and_then(|w| uuid::Uuid::parse_str(w).ok())
        .map(SessionId)
        .expect("the node said its session");

    let options = PostgresOptions::from_url(&pg.url)
        .expect("url")
        .schema(schema.as_str());
    let store = Arc::new(PostgresStore::connect_with(options).await.expect("connect"));
    let record = store.session(id).await.expect("record");
    assert!(!record.status.is_terminal(), "{record:?}");
    assert_eq!(record.finalizer_attempts, 1, "its run had started");
    assert!(
        app_rows(pg, &table, id).is_empty(),
        "its write was not committed"
    );

    // A live node takes the session over (the dead process is on this host) and finalizes
    // it: the finalizer runs again, and its row and the terminal status both exist, once.
    let rescuer = Supervisor::builder(
        harvest_fn(|_ctx: HarvestContext| async { Ok(()) }),
        harvest_supervisor::store::postgres::PostgresFinalizer::new(MarkHarvested {
            table: table.clone(),
            crash: false,
        }),
    )
    .store(Arc::clone(&store) as Arc<dyn SessionStore>)
    .start()
    .await
    .expect("start");
    let record = tokio::time::timeout(GUARD, rescuer.wait_finished(id))
        .await
        .expect("finalized")
        .expect("record");
    assert_eq!(record.status, SessionStatus::FinishedAllOk);
    assert_eq!(record.finalizer_error, None);
    assert_eq!(record.finalizer_attempts, 2);
    assert_eq!(app_rows(pg, &table, id), ["finished-all-ok 2"]);

    // A failing transactional finalizer leaves no row, and the session still ends.
    struct Fails(String);
    #[async_trait::async_trait]
    impl harvest_supervisor::store::postgres::TransactionalFinalizer for Fails {
        async fn finalize(
            &self,
            report: &harvest_supervisor::SessionReport,
            tx: &harvest_supervisor::store::postgres::tokio_postgres::Transaction<'_>,
        ) -> Result<(), harvest_supervisor::BoxError> {
            tx.execute(
                &format!(
                    "INSERT INTO {} (session_id, status) VALUES ($1, 'partial')",
                    self.0
                ),
                &[&report.session_id.0],
            )
            .await?;
            Err("the catalogue refused the update".into())
        }
    }
    rescuer.shutdown().await.expect("shutdown");
    let failing = Supervisor::builder(
        harvest_fn(|_ctx: HarvestContext| async { Ok(()) }),
        harvest_supervisor::store::postgres::PostgresFinalizer::new(Fails(table.clone())),
    )
    .store(Arc::clone(&store) as Arc<dyn SessionStore>)
    .start()
    .await
    .expect("start");
    let id = failing.start_session("csw", ["x"]).await.expect("start");
    let record = failing.wait_finished(id).await.expect("record");
    assert!(record.status.is_terminal());
    assert_eq!(
        record.finalizer_error.as_deref(),
        Some("the catalogue refused the update")
    );
    assert!(app_rows(pg, &table, id).is_empty(), "rolled back");
    let events = store.events(id).await.expect("events");
    assert!(events.iter().any(|e| matches!(
        &e.kind,
        EventKind::FinalizerFinished { error: Some(e), .. } if e == "the catalogue refused the update"
    )));
    failing.shutdown().await.expect("shutdown");

    // On another store it is refused at start.
    let refused = Supervisor::builder(
        harvest_fn(|_ctx: HarvestContext| async { Ok(()) }),
        harvest_supervisor::store::postgres::PostgresFinalizer::new(Fails(table)),
    )
    .start()
    .await;
    assert!(
        matches!(&refused, Err(harvest_supervisor::Error::Config(c)) if c.field() == "finalizer"),
        "{:?}",
        refused.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_outcome_of_a_resource_is_ignored_and_order_is_kept() {
    let test = "a_second_outcome_of_a_resource_is_ignored_and_order_is_kept";
    let Some(pg) = server(test) else {
        return;
    };
    let store = pg.store().await;
    let owner = NodeId::new();
    let fence = harvest_supervisor::Fence::new(owner);
    let record = store
        .create_session(NewSession {
            id: SessionId::new(),
            harvester_id: "csw".into(),
            resources: (0..6).map(|i| format!("r{i}").into()).collect(),
            started: chrono::Utc::now(),
            workflow_time: Duration::from_secs(60),
            config: SessionConfig::default().into(),
            owner,
        })
        .await
        .expect("create");
    let outcome = |r: &str, ok: bool| harvest_supervisor::OutcomeRecord {
        resource_id: r.into(),
        outcome: if ok {
            harvest_supervisor::ResourceOutcome::Succeeded
        } else {
            harvest_supervisor::ResourceOutcome::Failed {
                error: "second".into(),
            }
        },
        attempts: 1,
        elapsed: Duration::from_millis(5),
    };
    // In one batch: r3, r1, r3 again (queued together), r0.
    let receipts: Vec<_> = [("r3", true), ("r1", true), ("r3", false), ("r0", true)]
        .iter()
        .map(|(r, ok)| {
            store
                .queue_outcome(record.id, fence, &outcome(r, *ok))
                .expect("queued")
        })
        .collect();
    for receipt in receipts {
        receipt
            .answer()
            .await
            .expect("answered ok, the duplicate too");
    }
    // Across batches: r1 again, then r5.
    store
        .record_outcome(record.id, fence, outcome("r1", false))
        .await
        .expect("ignored");
    store
        .record_outcome(record.id, fence, outcome("r5", true))
        .await
        .expect("recorded");
    let read = store.session(record.id).await.expect("record");
    assert_eq!(read.counts.succeeded, 4, "each resource counted once");
    assert_eq!(read.counts.failed, 0, "the second outcomes were ignored");
    let order: Vec<String> = store
        .outcomes(record.id)
        .await
        .expect("outcomes")
        .iter()
        .map(|o| o.resource_id.to_string())
        .collect();
    assert_eq!(
        order,
        ["r3", "r1", "r0", "r5"],
        "in recorded order, the first of each"
    );
    let (page, total) = store.outcomes_page(record.id, 1, 2).await.expect("page");
    assert_eq!(total, 4);
    let page: Vec<String> = page.iter().map(|o| o.resource_id.to_string()).collect();
    assert_eq!(page, ["r1", "r0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_in_an_error_text_is_stored_replaced_and_blocks_nothing() {
    let test = "a_nul_character_in_an_error_text_is_stored_replaced_and_blocks_nothing";
    let Some(pg) = server(test) else {
        return;
    };
    // PostgreSQL's text has no NUL: one in an error message must not fail the batches it
    // is in (every other outcome of the batch with it) for ever.
    let store = Arc::new(pg.store().await);
    let sup = Supervisor::builder(
        harvest_fn(|ctx: HarvestContext| async move {
            if ctx.resource_id.as_str().starts_with("nul") {
                return Err("remote said \0 and stopped".into());
            }
            Ok(())
        }),
        finalizer_fn(|_| async { Err("the catalogue answered \0".into()) }),
    )
    .store(Arc::clone(&store) as Arc<dyn SessionStore>)
    .start()
    .await
    .expect("start");
    let resources: Vec<String> = (0..50)
        .map(|i| {
            if i % 10 == 3 {
                format!("nul{i}")
            } else {
                format!("ok{i}")
            }
        })
        .collect();
    let id = sup.start_session("csw", resources).await.expect("start");
    let record = tokio::time::timeout(GUARD, sup.wait_finished(id))
        .await
        .expect("finished")
        .expect("record");
    assert_eq!(record.status, SessionStatus::FinishedSomeFailed);
    assert_eq!((record.counts.succeeded, record.counts.failed), (45, 5));
    assert_eq!(
        record.finalizer_error.as_deref(),
        Some("the catalogue answered \u{FFFD}")
    );
    let outcomes = store.outcomes(id).await.expect("outcomes");
    assert_eq!(outcomes.len(), 50);
    let failed: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match &o.outcome {
            harvest_supervisor::ResourceOutcome::Failed { error } => Some(error.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(failed, ["remote said \u{FFFD} and stopped"; 5]);
    // The event log keeps the text as it was (JSON escapes it).
    let events = store.events(id).await.expect("events");
    assert!(events.iter().any(|e| matches!(
        &e.kind,
        EventKind::WorkerFailed { error, .. } if error.contains('\0')
    )));
    sup.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_chunks_are_stored_with_lz4_where_the_server_has_it() {
    // A chunk of events is tens of KiB of JSON, compressed as it is stored: pglz, the
    // server's default, was a large part of the writer's time per resource.
    let test = "event_chunks_are_stored_with_lz4_where_the_server_has_it";
    let Some(pg) = server(test) else {
        return;
    };
    let options = pg.options();
    let schema = options.schema_name().to_owned();
    let store = PostgresStore::connect_with(options).await.expect("connect");
    let owner = NodeId::new();
    let fence = harvest_supervisor::Fence::new(owner);
    let id = SessionId::new();
    store
        .create_session(NewSession {
            id,
            harvester_id: "csw".into(),
            resources: vec!["r0".into()].into(),
            started: chrono::Utc::now(),
            workflow_time: Duration::from_secs(60),
            config: SessionConfig::default().into(),
            owner,
        })
        .await
        .expect("create");
    for seq in 1..=256 {
        let event = harvest_supervisor::SessionEvent {
            seq,
            at: chrono::Utc::now(),
            session_id: id,
            harvester_id: "csw".into(),
            kind: EventKind::WorkerFailed {
                resource_id: format!("r{seq}").into(),
                attempt: 1,
                error: format!("remote said 500 for resource number {seq} of the catalogue"),
            },
        };
        store.append_event(fence, event).expect("append");
    }
    store.flush().await.expect("flush");
    let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let server_has_lz4 = client
        .batch_execute("SET default_toast_compression = 'lz4'")
        .await
        .is_ok();
    let rows = client
        .query(
            &format!("SELECT DISTINCT pg_column_compression(body) FROM {schema}.event_chunks"),
            &[],
        )
        .await
        .expect("query");
    let methods: Vec<Option<String>> = rows.iter().map(|r| r.get(0)).collect();
    let expected = if server_has_lz4 { "lz4" } else { "pglz" };
    assert_eq!(methods, [Some(expected.to_owned())], "{methods:?}");
}
