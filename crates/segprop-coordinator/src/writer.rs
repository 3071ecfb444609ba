//! The state store's writer: job documents are committed to redb in the order they were
//! queued, and no RPC holds the coordinator's state lock across a durable commit.
//!
//! A transition is made under the state lock, which also encodes the changed jobs and queues
//! them here ([`Writer::queue`], numbered in lock order). The lock is then released and the
//! call waits for its [`Ticket`] before it replies, so every transition is still on disk before
//! the RPC that caused it returns. The first waiting call commits everything queued, holding
//! only the database (group commit: calls that queue meanwhile are committed together by it or
//! the next one; a later document of a job replaces an earlier one in the same group), so an
//! uncontended commit costs no thread hand-off. A call that finds another committing blocks on
//! the database for at most [`BLOCK_FOR`], so that it commits its own write the moment the
//! other lets go instead of queueing behind the runtime's other tasks to be woken; past that
//! (a slow disk) it waits as an async task, so that a stuck commit holds no runtime thread
//! for longer. What a transition changes for watchers is
//! broadcast after the commit, in commit order: no watcher sees a state that is not durable.
//!
//! Calls that change nothing (a heartbeat that only renews its leases, a rendezvous) never
//! wait here; reads ([`Writer::barrier`]) wait only for the writes queued before them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use std::time::Instant;

use segprop_proto::v1 as pb;
use tokio::sync::{broadcast, watch};

use crate::store::{StateStore, StoreError};

/// One job's new state on the watchers' channel.
pub type JobEventMessage = Arc<(String, pb::JobEvent)>;

/// The most queued writes committed in one transaction.
const MAX_GROUP: usize = 256;

/// How long a waiting call trusts the committing one before it looks again itself.
const FOLLOW_FOR: Duration = Duration::from_millis(50);

/// How long a call that finds another committing blocks on the database, once, before it
/// waits as an async task: a few healthy commits' time.
const BLOCK_FOR: Duration = Duration::from_millis(5);

/// Changed jobs to commit, and what to tell watchers once they are committed.
struct Write {
    seq: u64,
    /// (job id, its JSON document).
    jobs: Vec<(String, Vec<u8>)>,
    next_job_seq: u64,
    events: Vec<JobEventMessage>,
}

/// Writes queued and not yet committed, and what became of the committed ones.
struct Queue {
    writes: VecDeque<Write>,
    /// The number of the last write queued.
    queued: u64,
    /// Writes that could not be committed, by number, until their ticket reads the error.
    failed: HashMap<u64, StoreError>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The database; holding it is being the one call that commits.
    store: parking_lot::Mutex<StateStore>,
    /// The number of the last write finished (committed or failed).
    done: watch::Sender<u64>,
    events: broadcast::Sender<JobEventMessage>,
    #[cfg(test)]
    hold: (Mutex<bool>, std::sync::Condvar),
    #[cfg(test)]
    fail_next: std::sync::atomic::AtomicBool,
}

/// Commits queued writes in order ([`Writer::queue`]); see the module doc.
pub struct Writer {
    shared: Arc<Shared>,
}

/// A queued write: [`Ticket::wait`] returns once it is committed, or with why it was not.
#[must_use = "a transition is acknowledged only after its ticket says it is durable"]
pub struct Ticket {
    seq: u64,
    /// A ticket of its own write reads that write's error; a barrier only waits.
    own: bool,
    shared: Arc<Shared>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ticket {
    /// Waits until the write is committed. `Ok` for a ticket of no write.
    ///
    /// The first waiting call commits everything queued (on its own thread, holding only the
    /// database); calls that queue meanwhile wait for it and are committed by it, or by the
    /// next one, in one transaction.
    pub async fn wait(self) -> Result<(), StoreError> {
        let seq = self.seq;
        let mut done = self.shared.done.subscribe();
        // Blocking is bounded once per call, not per look.
        let mut block_until = Some(Instant::now() + BLOCK_FOR);
        while *done.borrow_and_update() < seq {
            if self.shared.commit_up_to(seq, block_until.take()) {
                continue;
            }
            // Another call is committing: this write is in its group, or this call looks
            // again when that group is announced (the committer lets go of the database
            // first). The timeout is only a safety net.
            let _ = tokio::time::timeout(FOLLOW_FOR, done.changed()).await;
        }
        if !self.own {
            return Ok(());
        }
        match lock(&self.shared.queue).failed.remove(&seq) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Shared {
    /// Commits the queued writes, in groups, until write `seq` is committed, unless another
    /// call is committing (and still is at `block_until`, when given). Returns whether this
    /// call committed. Stopping at its own write keeps a call's reply from waiting on the
    /// commits of calls made after it.
    fn commit_up_to(&self, seq: u64, block_until: Option<Instant>) -> bool {
        let store = match block_until {
            Some(until) => self.store.try_lock_until(until),
            None => self.store.try_lock(),
        };
        let Some(store) = store else {
            return false;
        };
        let mut committed = false;
        loop {
            let group: Vec<Write> = {
                let mut queue = lock(&self.queue);
                let n = queue.writes.len().min(MAX_GROUP);
                queue.writes.drain(..n).collect()
            };
            let Some(last) = group.last().map(|w| w.seq) else {
                // Taken by a committer that has not announced it yet: wait for it.
                return committed;
            };
            committed = true;
            #[cfg(test)]
            self.wait_while_held();
            match self.commit(&store, &group) {
                // Announced before the database is let go, so groups are announced in order.
                Ok(()) => {
                    for event in group.into_iter().flat_map(|w| w.events) {
                        let _ = self.events.send(event);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, writes = group.len(), "state store write failed");
                    let mut queue = lock(&self.queue);
                    for w in &group {
                        queue.failed.insert(w.seq, e.clone());
                    }
                }
            }
            if last >= seq {
                // Let go first: a call woken by the announcement may commit the next group.
                drop(store);
                self.done.send_replace(last);
                return true;
            }
            self.done.send_replace(last);
        }
    }

    /// One transaction for a group of writes: the last document of each job, the largest next
    /// job sequence number.
    fn commit(&self, store: &StateStore, group: &[Write]) -> Result<(), StoreError> {
        #[cfg(test)]
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(StoreError {
                path: "coordinator.redb".into(),
                message: "injected write failure".into(),
            });
        }
        let mut latest: Vec<(&str, &[u8])> = Vec::new();
        for w in group {
            for (id, bytes) in &w.jobs {
                match latest.iter_mut().find(|(seen, _)| *seen == id.as_str()) {
                    Some(entry) => entry.1 = bytes,
                    None => latest.push((id, bytes)),
                }
            }
        }
        let next = group.iter().map(|w| w.next_job_seq).max().unwrap_or(1);
        store.save_encoded(&latest, next)
    }

    #[cfg(test)]
    fn wait_while_held(&self) {
        let (flag, cv) = &self.hold;
        let mut on = lock(flag);
        while *on {
            on = cv.wait(on).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Writer {
    /// A writer over `store`; committed job states are announced on `events`.
    pub fn new(store: StateStore, events: broadcast::Sender<JobEventMessage>) -> Self {
        let (done, _) = watch::channel(0u64);
        Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    writes: VecDeque::new(),
                    queued: 0,
                    failed: HashMap::new(),
                }),
                store: parking_lot::Mutex::new(store),
                done,
                events,
                #[cfg(test)]
                hold: (Mutex::new(false), std::sync::Condvar::new()),
                #[cfg(test)]
                fail_next: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Queues `jobs` (id and JSON document) and the next job sequence number for one durable
    /// commit, after which `events` are broadcast. Callers queue under the state lock, so
    /// writes are numbered and committed in the order their transitions were made.
    pub fn queue(
        &self,
        jobs: Vec<(String, Vec<u8>)>,
        next_job_seq: u64,
        events: Vec<JobEventMessage>,
    ) -> Ticket {
        let mut queue = lock(&self.shared.queue);
        queue.queued += 1;
        let seq = queue.queued;
        queue.writes.push_back(Write {
            seq,
            jobs,
            next_job_seq,
            events,
        });
        Ticket {
            seq,
            own: true,
            shared: self.shared.clone(),
        }
    }

    /// A ticket that waits for nothing (a transition that changed no job).
    pub fn nothing(&self) -> Ticket {
        Ticket {
            seq: 0,
            own: false,
            shared: self.shared.clone(),
        }
    }

    /// A ticket that waits for every write queued so far, without reading their errors. Taken
    /// under the state lock by a read, it replies with nothing that is not yet durable.
    pub fn barrier(&self) -> Ticket {
        Ticket {
            seq: lock(&self.shared.queue).queued,
            own: false,
            shared: self.shared.clone(),
        }
    }

    /// The number of writes queued so far.
    #[cfg(test)]
    pub fn queued(&self) -> u64 {
        lock(&self.shared.queue).queued
    }

    /// Holds every commit until the guard is dropped (tests of a slow disk).
    #[cfg(test)]
    pub fn hold(&self) -> HoldGuard {
        *lock(&self.shared.hold.0) = true;
        HoldGuard(self.shared.clone())
    }

    /// Makes the next commit fail (tests of a failing disk).
    #[cfg(test)]
    pub fn fail_next(&self) {
        self.shared
            .fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
pub struct HoldGuard(Arc<Shared>);

#[cfg(test)]
impl Drop for HoldGuard {
    fn drop(&mut self) {
        *lock(&self.0.hold.0) = false;
        self.0.hold.1.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(dir: &std::path::Path) -> (Writer, broadcast::Receiver<JobEventMessage>) {
        let (events, rx) = broadcast::channel(16);
        (
            Writer::new(StateStore::open(dir).expect("state store"), events),
            rx,
        )
    }

    fn event(id: &str) -> JobEventMessage {
        Arc::new((id.to_string(), pb::JobEvent::default()))
    }

    #[tokio::test]
    async fn writes_commit_in_order_and_announce_after_the_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (writer, mut rx) = writer(dir.path());
        let hold = writer.hold();
        let a = writer.queue(vec![("j1".into(), b"{}".to_vec())], 2, vec![event("j1")]);
        let b = writer.queue(vec![("j1".into(), b"{}".to_vec())], 3, vec![event("j1b")]);
        let barrier = writer.barrier();
        // Held: nothing announced yet.
        assert!(rx.try_recv().is_err());
        drop(hold);
        barrier.wait().await.expect("a barrier reads no error");
        a.wait().await.expect("first write");
        b.wait().await.expect("second write");
        assert_eq!(rx.recv().await.expect("event").0, "j1");
        assert_eq!(rx.recv().await.expect("event").0, "j1b");
        writer.nothing().wait().await.expect("no write");
    }

    #[tokio::test]
    async fn a_failed_write_is_told_to_its_ticket_and_announced_to_no_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (writer, mut rx) = writer(dir.path());
        writer.fail_next();
        let ticket = writer.queue(vec![("j1".into(), b"{}".to_vec())], 2, vec![event("j1")]);
        let err = ticket.wait().await.expect_err("the commit failed");
        assert!(err.message.contains("injected"), "{err}");
        assert!(rx.try_recv().is_err());
        // The next write commits.
        let ticket = writer.queue(vec![("j1".into(), b"{}".to_vec())], 2, vec![event("j1")]);
        ticket.wait().await.expect("a later write");
        assert_eq!(rx.recv().await.expect("event").0, "j1");
    }
}
