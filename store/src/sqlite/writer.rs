//! The writer thread: one connection that groups whatever writes are pending into one
//! transaction (group commit: one fsync for many messages), each write in its own savepoint so
//! that one failure does not undo its neighbours.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::SqliteStore;
use crate::{StoreError, StoreResult};

/// Most writes grouped into one transaction.
pub(super) const MAX_GROUP: usize = 1024;

impl SqliteStore {
    /// Runs a write on the writer thread and waits until its group committed.
    pub(super) async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.enqueue(f).await?.await
    }

    /// Queues a write for the writer thread; returns once it is queued (writes run in the order
    /// they were queued) with the wait for its result.
    pub(super) async fn enqueue<T, F>(
        &self,
        f: F,
    ) -> StoreResult<futures_util::future::BoxFuture<'static, StoreResult<T>>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = Box::new(Job {
            f: Some(f),
            result: None,
            tx,
        });
        self.writer
            .send(job)
            .await
            .map_err(|_| StoreError::unavailable("the writer thread stopped"))?;
        Ok(Box::pin(async move {
            rx.await
                .map_err(|_| StoreError::unavailable("the writer thread stopped"))?
        }))
    }
}

pub(super) fn open_writer(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    // WAL with synchronous=FULL: a commit returns only after the WAL is on disk, so an ack that
    // follows it survives a power cut.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// One write waiting for the writer thread.
pub(super) trait WriteJob: Send {
    /// Runs inside the group's transaction; false means "roll my savepoint back".
    fn run(&mut self, conn: &Connection) -> bool;
    /// Hands the result over once the group committed, or the error if it did not.
    fn complete(self: Box<Self>, committed: Result<(), StoreError>);
}

struct Job<T, F> {
    f: Option<F>,
    result: Option<StoreResult<T>>,
    tx: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> WriteJob for Job<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> StoreResult<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(f) = self.f.take() else { return false };
        let result = f(conn);
        let ok = !matches!(result, Err(StoreError::Unavailable(_) | StoreError::Deposed));
        self.result = Some(result);
        ok
    }

    fn complete(self: Box<Self>, committed: Result<(), StoreError>) {
        let outcome = match (committed, self.result) {
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::unavailable("write did not run")),
            (Err(err), _) => Err(err),
        };
        // The caller may have given up waiting; that is fine.
        let _ = self.tx.send(outcome);
    }
}

pub(super) fn writer_loop(conn: Connection, mut rx: mpsc::Receiver<Box<dyn WriteJob>>) {
    let mut jobs: Vec<Box<dyn WriteJob>> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // Every job of a failed group gets the group's error as its cause.
        let committed = run_group(&conn, &mut jobs).map_err(std::sync::Arc::new);
        if let Err(err) = &committed {
            tracing::warn!(cause = %err, writes = jobs.len(), "sqlite write group failed");
        }
        for job in jobs.drain(..) {
            let outcome = match &committed {
                Ok(()) => Ok(()),
                Err(err) => Err(StoreError::unavailable(err.clone())),
            };
            job.complete(outcome);
        }
    }
}

fn run_group(conn: &Connection, jobs: &mut [Box<dyn WriteJob>]) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        for job in jobs.iter_mut() {
            conn.execute_batch("SAVEPOINT job")?;
            if job.run(conn) {
                conn.execute_batch("RELEASE job")?;
            } else {
                conn.execute_batch("ROLLBACK TO job; RELEASE job")?;
            }
        }
        conn.execute_batch("COMMIT")
    })();
    if result.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}
