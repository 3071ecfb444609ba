//! The state store's writer: one thread commits job documents to redb in the order they were
//! queued, so no RPC holds the coordinator's state lock across a durable commit.
//!
//! A transition is made under the state lock, which also encodes the changed jobs and queues
//! them here ([`Writer::queue`], numbered in lock order). The lock is then released and the
//! call waits for its [`Ticket`] before it replies, so every transition is still on disk before
//! the RPC that caused it returns. What a transition changes for watchers is broadcast by this
//! thread after the commit, in commit order: no watcher sees a state that is not durable.
//!
//! Queued writes that find the thread busy are committed together in one transaction (group
//! commit); a later document of a job replaces an earlier one in the same group.
//!
//! Calls that change nothing (a heartbeat that only renews its leases, a rendezvous) never
//! wait here; reads ([`Writer::settled`]) wait only for the writes queued before them.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use segprop_proto::v1 as pb;
use tokio::sync::{broadcast, watch};

use crate::store::{StateStore, StoreError};

/// One job's new state on the watchers' channel.
pub type JobEventMessage = Arc<(String, pb::JobEvent)>;

/// The most queued writes committed in one transaction.
const MAX_GROUP: usize = 256;

/// Changed jobs to commit, and what to tell watchers once they are committed.
struct Write {
    seq: u64,
    /// (job id, its JSON document).
    jobs: Vec<(String, Vec<u8>)>,
    next_job_seq: u64,
    events: Vec<JobEventMessage>,
}

/// Sequence numbers of the writes that are queued, committed and failed.
struct Progress {
    /// The number of the last write queued.
    queued: u64,
    /// Writes that could not be committed, by number, until their ticket reads the error.
    failed: HashMap<u64, StoreError>,
}

pub struct Writer {
    queue: Mutex<Option<mpsc::Sender<Write>>>,
    progress: Arc<Mutex<Progress>>,
    /// The number of the last write the thread finished (committed or failed).
    done: watch::Receiver<u64>,
    thread: Option<std::thread::JoinHandle<()>>,
    #[cfg(test)]
    hold: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

/// A queued write: [`Ticket::wait`] returns once it is committed, or with why it was not.
#[must_use = "a transition is acknowledged only after its ticket says it is durable"]
pub struct Ticket {
    seq: u64,
    /// A ticket of its own write reads that write's error; a barrier only waits.
    own: bool,
    done: watch::Receiver<u64>,
    progress: Arc<Mutex<Progress>>,
}

impl Ticket {
    /// Waits until the write is committed. `Ok` for a ticket of no write.
    pub async fn wait(mut self) -> Result<(), StoreError> {
        if self.seq == 0 {
            return Ok(());
        }
        let seq = self.seq;
        // The sender lives as long as the writer thread, which finishes every queued write.
        let _ = self.done.wait_for(|done| *done >= seq).await;
        if !self.own {
            return Ok(());
        }
        match lock(&self.progress).failed.remove(&seq) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn lock(progress: &Mutex<Progress>) -> MutexGuard<'_, Progress> {
    progress.lock().unwrap_or_else(|e| e.into_inner())
}

impl Writer {
    /// Starts the writer thread, which owns `store` from now on. Committed job states are
    /// announced on `events`.
    pub fn start(store: StateStore, events: broadcast::Sender<JobEventMessage>) -> Self {
        let (tx, rx) = mpsc::channel::<Write>();
        let (done_tx, done) = watch::channel(0u64);
        let progress = Arc::new(Mutex::new(Progress {
            queued: 0,
            failed: HashMap::new(),
        }));
        #[cfg(test)]
        let hold = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        #[cfg(test)]
        let held = hold.clone();
        let failures = progress.clone();
        let thread = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while group.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(next) => group.push(next),
                            Err(_) => break,
                        }
                    }
                    #[cfg(test)]
                    {
                        let (flag, cv) = &*held;
                        let mut on = flag.lock().unwrap_or_else(|e| e.into_inner());
                        while *on {
                            on = cv.wait(on).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    let last = group.last().map_or(0, |w| w.seq);
                    match commit(&store, &group) {
                        Ok(()) => {
                            for event in group.into_iter().flat_map(|w| w.events) {
                                let _ = events.send(event);
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, writes = group.len(), "state store write failed");
                            let mut progress = lock(&failures);
                            for w in &group {
                                progress.failed.insert(w.seq, e.clone());
                            }
                        }
                    }
                    done_tx.send_replace(last);
                }
            })
            .expect("the OS can start the coordinator's writer thread");
        Self {
            queue: Mutex::new(Some(tx)),
            progress,
            done,
            thread: Some(thread),
            #[cfg(test)]
            hold,
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
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let seq = {
            let mut progress = lock(&self.progress);
            progress.queued += 1;
            progress.queued
        };
        let write = Write {
            seq,
            jobs,
            next_job_seq,
            events,
        };
        let sent = queue.as_ref().is_some_and(|tx| tx.send(write).is_ok());
        if !sent {
            // Only after the writer stopped (the coordinator is shutting down).
            lock(&self.progress).failed.insert(
                seq,
                StoreError {
                    path: String::new(),
                    message: "the state writer has stopped".into(),
                },
            );
        }
        Ticket {
            seq,
            own: true,
            done: if sent {
                self.done.clone()
            } else {
                watch::channel(seq).1
            },
            progress: self.progress.clone(),
        }
    }

    /// A ticket that waits for nothing (a transition that changed no job).
    pub fn nothing(&self) -> Ticket {
        Ticket {
            seq: 0,
            own: false,
            done: self.done.clone(),
            progress: self.progress.clone(),
        }
    }

    /// A ticket that waits for every write queued so far, without reading their errors. Taken
    /// under the state lock by a read, it replies with nothing that is not yet durable.
    pub fn barrier(&self) -> Ticket {
        Ticket {
            seq: lock(&self.progress).queued,
            own: false,
            done: self.done.clone(),
            progress: self.progress.clone(),
        }
    }

    /// The number of writes queued so far.
    #[cfg(test)]
    pub fn queued(&self) -> u64 {
        lock(&self.progress).queued
    }

    /// Holds every commit until the guard is dropped (tests of a slow disk).
    #[cfg(test)]
    pub fn hold(&self) -> HoldGuard {
        *self.hold.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        HoldGuard(self.hold.clone())
    }
}

#[cfg(test)]
pub struct HoldGuard(Arc<(Mutex<bool>, std::sync::Condvar)>);

#[cfg(test)]
impl Drop for HoldGuard {
    fn drop(&mut self) {
        *self.0.0.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0.1.notify_all();
    }
}

impl Drop for Writer {
    /// Finishes the queued writes and closes the database, so the state directory can be
    /// opened again as soon as the coordinator is gone.
    fn drop(&mut self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One transaction for a group of writes: the last document of each job, the largest next job
/// sequence number.
fn commit(store: &StateStore, group: &[Write]) -> Result<(), StoreError> {
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
mod tests {
    use super::*;

    fn writer(dir: &std::path::Path) -> (Writer, broadcast::Receiver<JobEventMessage>) {
        let (events, rx) = broadcast::channel(16);
        (
            Writer::start(StateStore::open(dir).expect("state store"), events),
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
        // The writer stopped (as at shutdown): a write queued after that is refused.
        let queue = writer.queue.lock().expect("queue").take();
        drop(queue);
        let ticket = writer.queue(vec![("j1".into(), b"{}".to_vec())], 2, vec![event("j1")]);
        let err = ticket.wait().await.expect_err("no writer");
        assert!(err.message.contains("stopped"), "{err}");
        assert!(rx.try_recv().is_err());
    }
}
