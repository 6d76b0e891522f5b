//! The zone state machine on RocksDB, and its snapshots.
//!
//! Apply writes each batch of entries, with the new last-applied log id,
//! in one RocksDB write batch, so a crash leaves the state at a batch
//! boundary. A snapshot is built by streaming a consistent RocksDB view of
//! the state column families into a file, and installed by streaming such
//! a file back in bounded write batches. Neither keeps the whole state in memory.
//! An install in progress is marked in the database so that a crash in the
//! middle is finished from the retained snapshot file at the next start.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, StorageIOError};
use rocksdb::{WriteBatch, WriteOptions, DB};
use tokio::sync::watch;

use super::db::{self, DbError, CF_SM_META, STATE_CFS};
use crate::raft::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::zone::apply::{apply_command, Txn};
use crate::zone::command::CommandResult;

const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_INSTALLING: &[u8] = b"installing";
/// Records per write batch when installing a snapshot.
const INSTALL_BATCH_RECORDS: usize = 4096;
const CURRENT_META: &str = "current.meta.json";
const CURRENT_DATA: &str = "current.snap";

#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    snapshot_dir: PathBuf,
    /// Last applied log index, for tasks that wait for apply to catch up.
    applied: watch::Sender<u64>,
}

impl StateMachine {
    /// Opens the state machine, finishing a snapshot install that a crash interrupted.
    pub fn open(db: Arc<DB>, snapshot_dir: &Path) -> Result<StateMachine, DbError> {
        fs::create_dir_all(snapshot_dir).map_err(io_to_db)?;
        let machine = StateMachine {
            db,
            snapshot_dir: snapshot_dir.to_path_buf(),
            applied: watch::channel(0).0,
        };
        if db::get::<SnapshotMeta>(&machine.db, CF_SM_META, KEY_INSTALLING)?.is_some() {
            tracing::warn!("finishing a snapshot install interrupted by a crash");
            let meta = read_current_meta(&machine.snapshot_dir)?
                .expect("an install marker is written only after the snapshot file is kept");
            let file = File::open(machine.snapshot_dir.join(CURRENT_DATA)).map_err(io_to_db)?;
            load_snapshot(&machine.db, &meta, file)?;
        }
        let applied: Option<LogId> = db::get(&machine.db, CF_SM_META, KEY_APPLIED)?;
        machine.applied.send_replace(applied.map_or(0, |id| id.index));
        Ok(machine)
    }

    /// Returns a receiver of the last applied log index.
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    fn apply_entries(&self, entries: Vec<Entry>) -> Result<Vec<CommandResult>, StorageError> {
        let mut txn = Txn::new(&self.db);
        let mut results = Vec::with_capacity(entries.len());
        let mut last = None;
        for entry in entries {
            let log_id = entry.log_id;
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::Empty,
                EntryPayload::Normal(command) => {
                    metrics::counter!("ccs_commands_applied_total", "command" => command.kind())
                        .increment(1);
                    apply_command(&mut txn, log_id.index, &command)
                        .map_err(|e| StorageIOError::apply(log_id, &e))?
                }
                EntryPayload::Membership(membership) => {
                    let stored = StoredMembership::new(Some(log_id), membership);
                    txn.put(CF_SM_META, KEY_MEMBERSHIP, &stored)
                        .map_err(|e| StorageIOError::apply(log_id, &e))?;
                    CommandResult::Empty
                }
            };
            results.push(result);
            last = Some(log_id);
        }
        let Some(last) = last else {
            return Ok(results);
        };
        txn.put(CF_SM_META, KEY_APPLIED, &last)
            .map_err(|e| StorageIOError::apply(last, &e))?;
        // Unsynced: the log contains every applied entry until a snapshot covers
        // it, and `write_snapshot` syncs the WAL before it reads the state.
        self.db
            .write(txn.into_batch())
            .map_err(|e| StorageIOError::apply(last, &e))?;
        self.applied.send_replace(last.index);
        metrics::gauge!("ccs_raft_applied_index").set(last.index as f64);
        Ok(results)
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot>, DbError> {
        let Some(meta) = read_current_meta(&self.snapshot_dir)? else {
            return Ok(None);
        };
        let file = File::open(self.snapshot_dir.join(CURRENT_DATA)).map_err(io_to_db)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

fn io_to_db(e: std::io::Error) -> DbError {
    DbError::Io(e)
}

fn read_current_meta(dir: &Path) -> Result<Option<SnapshotMeta>, DbError> {
    match fs::read(dir.join(CURRENT_META)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io_to_db(std::io::Error::other(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_to_db(e)),
    }
}

/// Makes `data` (a complete snapshot file) and `meta` the current snapshot.
fn keep_snapshot(dir: &Path, meta: &SnapshotMeta, data: &Path) -> Result<(), DbError> {
    let meta_tmp = dir.join("meta.tmp");
    let json = serde_json::to_vec(meta).map_err(|e| io_to_db(std::io::Error::other(e)))?;
    let mut file = File::create(&meta_tmp).map_err(io_to_db)?;
    file.write_all(&json).map_err(io_to_db)?;
    file.sync_all().map_err(io_to_db)?;
    fs::rename(data, dir.join(CURRENT_DATA)).map_err(io_to_db)?;
    fs::rename(&meta_tmp, dir.join(CURRENT_META)).map_err(io_to_db)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_to_db)?;
    Ok(())
}

/// Snapshot file format: a sequence of records, each
/// `[column family index: u8][key length: u32 BE][key][value length: u32 BE][value]`.
fn write_snapshot(db: &DB, path: &Path) -> Result<SnapshotMeta, DbError> {
    // Sync first so the snapshot never covers state a crash could lose.
    db.flush_wal(true)?;
    let view = db.snapshot();
    let applied: Option<LogId> = match view.get_cf(cf(db, CF_SM_META), KEY_APPLIED)? {
        Some(bytes) => Some(db::decode(CF_SM_META, &bytes)?),
        None => None,
    };
    let membership: StoredMembership = match view.get_cf(cf(db, CF_SM_META), KEY_MEMBERSHIP)? {
        Some(bytes) => db::decode(CF_SM_META, &bytes)?,
        None => StoredMembership::default(),
    };
    let mut out = BufWriter::new(File::create(path).map_err(io_to_db)?);
    for (index, name) in STATE_CFS.iter().enumerate() {
        for item in view.iterator_cf(cf(db, name), rocksdb::IteratorMode::Start) {
            let (key, value) = item?;
            write_record(&mut out, index as u8, &key, &value).map_err(io_to_db)?;
        }
    }
    let file = out.into_inner().map_err(|e| io_to_db(e.into_error()))?;
    file.sync_all().map_err(io_to_db)?;
    let snapshot_id = match applied {
        Some(id) => format!("{}-{}-{}", id.leader_id.term, id.leader_id.node_id, id.index),
        None => "empty".to_string(),
    };
    Ok(SnapshotMeta {
        last_log_id: applied,
        last_membership: membership,
        snapshot_id,
    })
}

fn write_record(out: &mut impl Write, cf: u8, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    out.write_all(&[cf])?;
    out.write_all(&(key.len() as u32).to_be_bytes())?;
    out.write_all(key)?;
    out.write_all(&(value.len() as u32).to_be_bytes())?;
    out.write_all(value)
}

/// Reads one record, or `None` at a clean end of file.
fn read_record(input: &mut impl Read) -> std::io::Result<Option<(u8, Vec<u8>, Vec<u8>)>> {
    let mut cf = [0u8; 1];
    match input.read_exact(&mut cf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let key = read_chunk(input)?;
    let value = read_chunk(input)?;
    Ok(Some((cf[0], key, value)))
}

fn read_chunk(input: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let mut chunk = vec![0u8; u32::from_be_bytes(len) as usize];
    input.read_exact(&mut chunk)?;
    Ok(chunk)
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("column family is created at open")
}

fn synced() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

/// Replaces the state with a snapshot file's records.
fn load_snapshot(db: &DB, meta: &SnapshotMeta, file: File) -> Result<(), DbError> {
    let mut marker = WriteBatch::default();
    marker.put_cf(cf(db, CF_SM_META), KEY_INSTALLING, db::encode(meta)?);
    db.write_opt(marker, &synced())?;

    let mut clear = WriteBatch::default();
    for name in STATE_CFS {
        clear.delete_range_cf(cf(db, name), Vec::<u8>::new(), vec![0xffu8; 64]);
    }
    db.write(clear)?;

    let mut input = BufReader::new(file);
    let mut batch = WriteBatch::default();
    while let Some((index, key, value)) = read_record(&mut input).map_err(io_to_db)? {
        let Some(name) = STATE_CFS.get(index as usize) else {
            return Err(io_to_db(std::io::Error::other(format!(
                "snapshot names unknown column family index {index}"
            ))));
        };
        if *name == CF_SM_META && key == KEY_INSTALLING {
            continue;
        }
        batch.put_cf(cf(db, name), key, value);
        if batch.len() >= INSTALL_BATCH_RECORDS {
            db.write(std::mem::take(&mut batch))?;
        }
    }
    // KEY_APPLIED always stores a plain `LogId`; its absence means nothing is applied.
    match &meta.last_log_id {
        Some(applied) => batch.put_cf(cf(db, CF_SM_META), KEY_APPLIED, db::encode(applied)?),
        None => batch.delete_cf(cf(db, CF_SM_META), KEY_APPLIED),
    }
    batch.put_cf(cf(db, CF_SM_META), KEY_MEMBERSHIP, db::encode(&meta.last_membership)?);
    batch.delete_cf(cf(db, CF_SM_META), KEY_INSTALLING);
    db.write_opt(batch, &synced())?;
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let db = self.db.clone();
        let dir = self.snapshot_dir.clone();
        let meta = tokio::task::spawn_blocking(move || -> Result<SnapshotMeta, DbError> {
            let building = dir.join("building.snap");
            let meta = write_snapshot(&db, &building)?;
            keep_snapshot(&dir, &meta, &building)?;
            Ok(meta)
        })
        .await
        .expect("snapshot build task panicked")
        .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        tracing::info!(snapshot_id = %meta.snapshot_id, "built snapshot");
        metrics::counter!("ccs_raft_snapshots_built_total").increment(1);
        let snapshot = self
            .current_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        Ok(snapshot.expect("the snapshot was just kept"))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let read = |e: DbError| StorageError::from(StorageIOError::read_state_machine(&e));
        let applied: Option<LogId> = db::get(&self.db, CF_SM_META, KEY_APPLIED).map_err(read)?;
        let membership = db::get(&self.db, CF_SM_META, KEY_MEMBERSHIP)
            .map_err(read)?
            .unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        tokio::task::block_in_place(|| self.apply_entries(entries))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.snapshot_dir.join("receiving.snap");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let signature = meta.signature();
        let write_err = |e: DbError| StorageIOError::write_snapshot(Some(meta.signature()), &e);
        let file = snapshot.into_std().await;
        file.sync_all().map_err(|e| write_err(io_to_db(e)))?;
        drop(file);
        let db = self.db.clone();
        let dir = self.snapshot_dir.clone();
        let owned_meta = meta.clone();
        tokio::task::spawn_blocking(move || -> Result<(), DbError> {
            keep_snapshot(&dir, &owned_meta, &dir.join("receiving.snap"))?;
            let mut data = File::open(dir.join(CURRENT_DATA)).map_err(io_to_db)?;
            data.seek(SeekFrom::Start(0)).map_err(io_to_db)?;
            load_snapshot(&db, &owned_meta, data)
        })
        .await
        .expect("snapshot install task panicked")
        .map_err(|e| StorageIOError::write_snapshot(Some(signature), &e))?;
        let index = meta.last_log_id.map_or(0, |id| id.index);
        self.applied.send_replace(index);
        tracing::info!(snapshot_id = %meta.snapshot_id, "installed snapshot");
        metrics::counter!("ccs_raft_snapshots_installed_total").increment(1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        self.current_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, &e).into())
    }
}
