//! The Raft log on RocksDB, with group commit.
//!
//! openraft 0.9 hands the store one `append` per client write. Each append
//! writes its entries to RocksDB without a sync and passes its flush
//! callback to one syncer thread. The syncer takes every callback queued
//! while the previous sync ran, syncs the write-ahead log once, and then
//! reports all of them durable, so concurrent writes share one fsync.
//! The vote is written with a synchronous write before `save_vote` returns.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{StorageIOError, Vote};
use rocksdb::{WriteBatch, WriteOptions, DB};

use super::db::{self, index_key, CF_LOGS, CF_RAFT};
use crate::raft::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

/// An append whose entries are written but not yet synced.
struct PendingFlush {
    callback: LogFlushed<TypeConfig>,
    entries: usize,
}

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    syncer: mpsc::Sender<PendingFlush>,
    /// False only under the `skip_fsync` canary, which breaks durability on purpose.
    fsync: bool,
}

impl LogStore {
    /// Creates the log store and starts its syncer thread, which ends when
    /// every clone of the store is dropped.
    pub fn new(db: Arc<DB>) -> LogStore {
        LogStore::with_fsync(db, true)
    }

    /// Creates a log store that, with `fsync` false, reports appends and
    /// votes durable once they reach the operating system, without fsync.
    /// Only the `skip_fsync` canary passes false.
    pub fn with_fsync(db: Arc<DB>, fsync: bool) -> LogStore {
        let (sender, receiver) = mpsc::channel();
        let sync_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || run_syncer(sync_db, receiver, fsync))
            .expect("spawning the log sync thread");
        LogStore {
            db,
            syncer: sender,
            fsync,
        }
    }

    fn raft_get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        db::get(&self.db, CF_RAFT, key).map_err(|e| StorageIOError::read(&e).into())
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<(), rocksdb::Error> {
        let mut options = WriteOptions::default();
        options.set_sync(self.fsync);
        self.db.write_opt(batch, &options)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family is created at open")
    }
}

/// Syncs the write-ahead log once for every group of queued appends.
fn run_syncer(db: Arc<DB>, receiver: mpsc::Receiver<PendingFlush>, fsync: bool) {
    while let Ok(first) = receiver.recv() {
        let mut group = vec![first];
        group.extend(receiver.try_iter());
        let entries: usize = group.iter().map(|pending| pending.entries).sum();
        let result = db.flush_wal(fsync);
        metrics::counter!("ccs_raft_log_syncs_total").increment(1);
        metrics::histogram!("ccs_raft_log_entries_per_sync").record(entries as f64);
        for pending in group {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            pending.callback.log_io_completed(outcome);
        }
        if let Err(e) = result {
            // openraft stops the node when a flush fails; nothing more to do here.
            tracing::error!(error = %e, "raft log sync failed");
        }
    }
}

fn range_to_keys<RB: RangeBounds<u64>>(range: &RB) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(i) => Some(i + 1),
        Bound::Excluded(i) => Some(*i),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = range_to_keys(&range);
        let mut entries = Vec::new();
        let mode = rocksdb::IteratorMode::From(&index_key(start), rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_LOGS), mode) {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = db::index_from_key(&key);
            if end.is_some_and(|end| index >= end) {
                break;
            }
            let entry: Entry = db::decode(CF_LOGS, &value).map_err(|e| StorageIOError::read_logs(&e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.raft_get(KEY_PURGED)?;
        let mut last = self.db.iterator_cf(self.cf(CF_LOGS), rocksdb::IteratorMode::End);
        let last_log_id = match last.next() {
            Some(item) => {
                let (_, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
                let entry: Entry =
                    db::decode(CF_LOGS, &value).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes = db::encode(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_RAFT), KEY_VOTE, bytes);
        self.write_synced(batch).map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.raft_get(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Unsynced: a lost committed id only means re-applying from the last
        // applied index, which the log still holds.
        let bytes = db::encode(&committed).map_err(|e| StorageIOError::write(&e))?;
        self.db
            .put_cf(self.cf(CF_RAFT), KEY_COMMITTED, bytes)
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.raft_get::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        let mut count = 0;
        for entry in entries {
            let bytes = db::encode(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.put_cf(self.cf(CF_LOGS), index_key(entry.log_id.index), bytes);
            count += 1;
        }
        self.db.write(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        let pending = PendingFlush {
            callback,
            entries: count,
        };
        if let Err(mpsc::SendError(pending)) = self.syncer.send(pending) {
            let error = std::io::Error::other("raft log sync thread has stopped");
            pending.callback.log_io_completed(Err(error));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_LOGS), index_key(log_id.index), index_key(u64::MAX));
        self.write_synced(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = db::encode(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_RAFT), KEY_PURGED, bytes);
        batch.delete_range_cf(self.cf(CF_LOGS), index_key(0), index_key(log_id.index + 1));
        self.write_synced(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
