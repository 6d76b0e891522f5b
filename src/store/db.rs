//! The RocksDB instance behind one controller replica: its column families,
//! key encoding and typed reads. The Raft log and the state machine share
//! one database and so one write-ahead log: a synced log append also makes
//! every earlier state-machine write durable.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Raft log entries, keyed by big-endian log index.
pub const CF_LOGS: &str = "logs";
/// Vote, committed log id and last purged log id.
pub const CF_RAFT: &str = "raft";
/// Last applied log id and last membership of the state machine.
pub const CF_SM_META: &str = "sm_meta";
pub const CF_PODS: &str = "pods";
pub const CF_HOSTS: &str = "hosts";
pub const CF_INSTANCES: &str = "instances";
/// Instance name to instance id.
pub const CF_NAMES: &str = "names";
/// Client request id to instance id, for retried creates.
pub const CF_REQUESTS: &str = "requests";
/// Operation journal, keyed by big-endian order id.
pub const CF_JOURNAL: &str = "journal";
/// Zone keys: operator metadata in a small key-value store.
pub const CF_KEYS: &str = "keys";
/// Pod name to `PodProfile`.
pub const CF_POD_PROFILES: &str = "pod_profiles";
/// Network name to `Network`.
pub const CF_NETWORKS: &str = "networks";
/// Free segmentation ids of each pod, as ranges. The key is the pod name, a
/// zero byte and the range's first id (big-endian u32). The value is its last id.
pub const CF_SEGMENTATION_FREE: &str = "segmentation_free";
/// Volume id to `Volume`.
pub const CF_VOLUMES: &str = "volumes";
/// Volume name to volume id.
pub const CF_VOLUME_NAMES: &str = "volume_names";
/// SAN pod name to `SanPool`.
pub const CF_SAN_POOLS: &str = "san_pools";
/// Instance id to `InstanceDevices`.
pub const CF_DEVICES: &str = "devices";
/// IP leases: network name, a zero byte and the address (big-endian u32),
/// to the instance id holding it.
pub const CF_LEASES: &str = "leases";
/// Instance id to the `Move` of its migration in progress.
pub const CF_MOVES: &str = "moves";
/// Stale copies to evict: host id, a zero byte and the instance id, to `StaleCopy`.
pub const CF_STALE_COPIES: &str = "stale_copies";
/// Host id to its latest `FenceRecord`.
pub const CF_FENCES: &str = "fences";

/// The column families that make up the state machine, in snapshot order.
/// A snapshot record names its column family by position here, so new
/// families are appended.
pub const STATE_CFS: [&str; 19] = [
    CF_SM_META,
    CF_PODS,
    CF_HOSTS,
    CF_INSTANCES,
    CF_NAMES,
    CF_REQUESTS,
    CF_JOURNAL,
    CF_KEYS,
    CF_POD_PROFILES,
    CF_NETWORKS,
    CF_SEGMENTATION_FREE,
    CF_VOLUMES,
    CF_VOLUME_NAMES,
    CF_SAN_POOLS,
    CF_DEVICES,
    CF_LEASES,
    CF_MOVES,
    CF_STALE_COPIES,
    CF_FENCES,
];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("encoding a record failed: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
    #[error("record in column family {cf} is corrupt: {source}")]
    Decode {
        cf: &'static str,
        source: bincode::error::DecodeError,
    },
}

/// Opens (or creates) the replica's database under `dir`.
pub fn open(dir: &Path) -> Result<Arc<DB>, DbError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // Keep the WAL on: fsync of the WAL is what makes appends durable.
    options.set_manual_wal_flush(false);
    let mut names = vec![CF_LOGS, CF_RAFT];
    names.extend(STATE_CFS);
    let descriptors = names
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    let db = DB::open_cf_descriptors(&options, dir, descriptors)?;
    Ok(Arc::new(db))
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, DbError> {
    Ok(bincode::serde::encode_to_vec(value, bincode::config::standard())?)
}

pub fn decode<T: DeserializeOwned>(cf: &'static str, bytes: &[u8]) -> Result<T, DbError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(value, _)| value)
        .map_err(|source| DbError::Decode { cf, source })
}

pub fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

pub fn index_from_key(key: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&key[..8]);
    u64::from_be_bytes(bytes)
}

/// Reads and decodes one record.
pub fn get<T: DeserializeOwned>(db: &DB, cf: &'static str, key: &[u8]) -> Result<Option<T>, DbError> {
    let handle = db.cf_handle(cf).expect("column family is created at open");
    match db.get_pinned_cf(&handle, key)? {
        Some(bytes) => Ok(Some(decode(cf, &bytes)?)),
        None => Ok(None),
    }
}

/// Reads and decodes every record of a column family, in key order.
pub fn scan<T: DeserializeOwned>(db: &DB, cf: &'static str) -> Result<Vec<T>, DbError> {
    let handle = db.cf_handle(cf).expect("column family is created at open");
    let mut out = Vec::new();
    for item in db.iterator_cf(&handle, rocksdb::IteratorMode::Start) {
        let (_, value) = item?;
        out.push(decode(cf, &value)?);
    }
    Ok(out)
}
