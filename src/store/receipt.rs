//! Receipts of outcome writes queued with a store ([`SessionStore::queue_outcome`]).
//!
//! [`SessionStore::queue_outcome`]: crate::store::SessionStore::queue_outcome

use tokio::sync::oneshot;

use crate::error::StoreError;

/// A queued outcome write, answered once the store has committed it (or failed it).
///
/// ```
/// use harvest_supervisor::StoreError;
/// use harvest_supervisor::store::OutcomeReceipt;
///
/// // A store answers from its writer once the batch holding the write is committed:
/// let (answer, mut receipt) = OutcomeReceipt::new();
/// assert!(receipt.try_answer().is_none(), "not committed yet");
/// answer.send(Ok(()));
/// assert!(matches!(receipt.try_answer(), Some(Ok(()))));
///
/// // An answer dropped unsent (the store closed) reads as `Closed`.
/// let (answer, receipt) = OutcomeReceipt::new();
/// drop(answer);
/// let result = futures::executor::block_on(receipt.answer());
/// assert!(matches!(result, Err(StoreError::Closed)));
/// ```
#[derive(Debug)]
pub struct OutcomeReceipt(oneshot::Receiver<Result<(), StoreError>>);

/// The store's side of an [`OutcomeReceipt`]: answer it once the write is committed.
#[derive(Debug)]
pub struct OutcomeAnswer(oneshot::Sender<Result<(), StoreError>>);

impl OutcomeReceipt {
    /// A receipt and the answer that settles it.
    pub fn new() -> (OutcomeAnswer, OutcomeReceipt) {
        let (tx, rx) = oneshot::channel();
        (OutcomeAnswer(tx), OutcomeReceipt(rx))
    }

    /// The answer, if it has come (without registering for a wake-up). Ask until it gives
    /// one, then no more.
    pub fn try_answer(&mut self) -> Option<Result<(), StoreError>> {
        match self.0.try_recv() {
            Ok(result) => Some(result),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(StoreError::Closed)),
        }
    }

    /// Waits for the answer.
    pub async fn answer(self) -> Result<(), StoreError> {
        self.0.await.unwrap_or(Err(StoreError::Closed))
    }
}

impl OutcomeAnswer {
    /// Settles the receipt. (A receipt already dropped is no error: nobody is waiting.)
    pub fn send(self, result: Result<(), StoreError>) {
        let _ = self.0.send(result);
    }
}
