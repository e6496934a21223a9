//! Numeric ids for users and rooms, below 2^53, allocated in blocks.
//!
//! `id_blocks (name, next)` holds, per kind of id, the first id nobody has taken yet. A process
//! takes a whole block `[next, next + BLOCK)` with one lightweight transaction
//! (`UPDATE … SET next = next + BLOCK IF next = <seen>`, or `INSERT … IF NOT EXISTS` for the very
//! first block) and then hands ids out of it from memory. Paxos makes the compare-and-set
//! linearizable, so two processes never hold overlapping blocks; ids left in a block when a
//! process stops are simply never used.

use chatoy_protocol::MAX_ID;
use scylla::client::session::Session;
use tokio::sync::Mutex;

use super::exec::{lwt, read_one, CqlError, CqlResult};
use super::statements::Statements;

/// How many ids one lightweight transaction reserves.
const BLOCK: i64 = 100;
/// How many lost compare-and-set races a refill tolerates before giving up.
const MAX_ATTEMPTS: usize = 64;

/// Hands out the ids of one name (`users`, `rooms`) from the block this process holds.
pub(crate) struct IdAllocator {
    name: &'static str,
    state: Mutex<Block>,
}

/// The ids this process may still hand out: `next..end`; `end` is also our best guess of the
/// stored `next` for the following compare-and-set.
#[derive(Default)]
struct Block {
    next: i64,
    end: i64,
    /// The stored `next` as last seen, if any (None before the first refill).
    seen: Option<i64>,
}

impl IdAllocator {
    /// An allocator that holds no block yet.
    pub(crate) fn new(name: &'static str) -> Self {
        IdAllocator {
            name,
            state: Mutex::new(Block::default()),
        }
    }

    /// The next id, taking a new block from the database when the current one is used up.
    pub(crate) async fn next(&self, session: &Session, statements: &Statements) -> CqlResult<u64> {
        let mut block = self.state.lock().await;
        if block.next >= block.end {
            self.refill(&mut block, session, statements).await?;
        }
        let id = block.next;
        block.next += 1;
        u64::try_from(id).map_err(|_| CqlError::Inconsistent(format!("negative id {id} in id_blocks")))
    }

    async fn refill(&self, block: &mut Block, session: &Session, statements: &Statements) -> CqlResult<()> {
        for _ in 0..MAX_ATTEMPTS {
            let current = match block.seen {
                None => {
                    let claim = lwt(session, &statements.id_block_create, (self.name, 1 + BLOCK)).await?;
                    if claim.applied {
                        *block = Block {
                            next: 1,
                            end: 1 + BLOCK,
                            seen: Some(1 + BLOCK),
                        };
                        return Ok(());
                    }
                    match claim.bigint("next") {
                        Some(next) => Some(next),
                        None => self.read_next(session, statements).await?,
                    }
                }
                Some(seen) => {
                    let end = seen
                        .checked_add(BLOCK)
                        .filter(|end| *end - 1 <= MAX_ID as i64)
                        .ok_or_else(|| CqlError::Inconsistent(format!("{} ids are exhausted", self.name)))?;
                    let claim = lwt(session, &statements.id_block_take, (end, self.name, seen)).await?;
                    if claim.applied {
                        *block = Block {
                            next: seen,
                            end,
                            seen: Some(end),
                        };
                        return Ok(());
                    }
                    match claim.bigint("next") {
                        Some(next) => Some(next),
                        None => self.read_next(session, statements).await?,
                    }
                }
            };
            block.seen = current;
        }
        Err(CqlError::Inconsistent(format!(
            "could not reserve {} ids after {MAX_ATTEMPTS} attempts (too much contention)",
            self.name
        )))
    }

    /// Reads the stored `next` with a serial read, for databases that do not return the current
    /// row with a refused transaction.
    async fn read_next(&self, session: &Session, statements: &Statements) -> CqlResult<Option<i64>> {
        let row: Option<(i64,)> = read_one(session, &statements.id_block_read, (self.name,)).await?;
        Ok(row.map(|(next,)| next))
    }
}
