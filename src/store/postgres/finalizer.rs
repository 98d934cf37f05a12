//! The transactional finalizer: the user's finalizer runs inside the transaction that
//! completes the session, so what it writes in the same database (marking the harvest done
//! in the application's tables, say) commits together with the terminal status, or not at
//! all. Exactly-once effects for what lives in that database: a crash before the commit
//! leaves neither, and recovery runs the finalizer again in a new transaction.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;

use crate::error::StoreError;
use crate::harvest::{BoxError, InCompletion, SessionFinalizer, error_chain};
use crate::model::SessionReport;
use crate::store::postgres::rows::backend;

/// A finalizer that writes through the transaction completing the session: see
/// [`PostgresFinalizer`].
///
/// Its writes commit with the terminal status. An error or a panic rolls them back (to a
/// savepoint taken before it ran) and the session still completes, with that error as its
/// `finalizer_error`. After a crash before the commit, recovery runs it again in a new
/// transaction (whatever `FinalizerRecovery` says: the first run committed nothing), so
/// `report.finalizer_attempt` may be above 1, but its effects exist once.
///
/// Do not commit or roll back the transaction yourself, and keep it short: it holds the
/// session's row locked, and the store's `lock_timeout` ends a transaction left idle.
#[async_trait]
pub trait TransactionalFinalizer: Send + Sync + 'static {
    /// Records the session's outcome through `tx`.
    async fn finalize(
        &self,
        report: &SessionReport,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), BoxError>;
}

/// A [`SessionFinalizer`] whose work runs inside the PostgreSQL store's completing
/// transaction. Give it to `Supervisor::builder` with a [`super::PostgresStore`] (starting
/// it on another store is a configuration error).
///
/// ```no_run
/// use harvest_supervisor::store::postgres::{tokio_postgres, PostgresFinalizer, TransactionalFinalizer};
/// use harvest_supervisor::store::PostgresStore;
/// use harvest_supervisor::{harvest_fn, BoxError, SessionReport, Supervisor};
/// use std::sync::Arc;
///
/// struct MarkHarvested;
///
/// #[async_trait::async_trait]
/// impl TransactionalFinalizer for MarkHarvested {
///     async fn finalize(
///         &self,
///         report: &SessionReport,
///         tx: &tokio_postgres::Transaction<'_>,
///     ) -> Result<(), BoxError> {
///         // Commits with the session's terminal status, or not at all.
///         tx.execute(
///             "INSERT INTO harvests (session_id, status, harvested) VALUES ($1, $2, $3)",
///             &[&report.session_id.0, &report.status.to_string(), &(report.counts.succeeded as i64)],
///         )
///         .await?;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PostgresStore::connect("postgres://harvester@db.example/geonode").await?;
/// let supervisor = Supervisor::builder(
///     harvest_fn(|_ctx| async { Ok(()) }),
///     PostgresFinalizer::new(MarkHarvested),
/// )
/// .store(Arc::new(store))
/// .start()
/// .await?;
/// # supervisor.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresFinalizer {
    work: Arc<dyn TransactionalFinalizer>,
}

impl PostgresFinalizer {
    /// Wraps `finalizer`.
    pub fn new(finalizer: impl TransactionalFinalizer) -> Self {
        Self {
            work: Arc::new(finalizer),
        }
    }
}

impl std::fmt::Debug for PostgresFinalizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresFinalizer")
    }
}

/// What [`InCompletion`] holds for this store.
type Work = Arc<dyn TransactionalFinalizer>;

#[async_trait]
impl SessionFinalizer for PostgresFinalizer {
    async fn finalize(&self, _report: SessionReport) -> Result<(), BoxError> {
        // Never called: `in_completion` says the store runs it.
        Err("a transactional finalizer runs only inside the PostgreSQL store's completion".into())
    }

    fn in_completion(&self) -> Option<InCompletion> {
        let work: Work = Arc::clone(&self.work);
        Some(InCompletion::new(Arc::new(work)))
    }
}

/// The work in `work`, if this store made it.
pub(crate) fn work_of(work: &InCompletion) -> Option<&Work> {
    work.work().downcast_ref::<Work>()
}

/// Runs `work` in `tx` behind a savepoint: `Ok(None)` if it succeeded (its writes stay in
/// the transaction), `Ok(Some(error))` if it failed or panicked (its writes rolled back),
/// `Err` if the transaction itself failed (the completion is tried again).
pub(crate) async fn run(
    tx: &deadpool_postgres::Transaction<'_>,
    work: &dyn TransactionalFinalizer,
    report: &SessionReport,
) -> Result<Option<String>, StoreError> {
    tx.batch_execute("SAVEPOINT finalizer")
        .await
        .map_err(backend)?;
    let ran = AssertUnwindSafe(work.finalize(report, tx))
        .catch_unwind()
        .await;
    let error = match ran {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(error_chain(e.as_ref())),
        Err(panic) => Some(format!(
            "the finalizer panicked: {}",
            crate::finalizer::panic_message(&*panic)
        )),
    };
    let end = if error.is_some() {
        "ROLLBACK TO SAVEPOINT finalizer; RELEASE SAVEPOINT finalizer"
    } else {
        "RELEASE SAVEPOINT finalizer"
    };
    tx.batch_execute(end).await.map_err(backend)?;
    Ok(error)
}
