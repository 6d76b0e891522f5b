//! The agent's fencing token: the highest leader id it has accepted an order
//! from, kept in a file so that it survives restarts.
//!
//! An order from a leader older than the stored one is rejected. A newer
//! leader id is written and synced to disk before its order runs, so a crash
//! cannot make the agent forget a leader it already obeyed.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

use crate::zone::model::LeaderStamp;

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("order from leader (term {}, node {}) is older than accepted leader (term {}, node {})", .order.term, .order.node_id, .accepted.term, .accepted.node_id)]
    Stale {
        order: LeaderStamp,
        accepted: LeaderStamp,
    },
    #[error("fencing state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fencing state file {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

pub struct Fence {
    path: PathBuf,
    accepted: Mutex<Option<LeaderStamp>>,
}

impl Fence {
    /// Loads the stored leader id from `dir/fence.json`, if any.
    pub fn open(dir: &Path) -> Result<Fence, FenceError> {
        let path = dir.join("fence.json");
        let io = |source| FenceError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let accepted = match fs::read(&path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| FenceError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        Ok(Fence {
            path,
            accepted: Mutex::new(accepted),
        })
    }

    /// Admits an order from `leader`, or rejects it if a newer leader was
    /// accepted. Holding the returned guard keeps a newer leader from being
    /// admitted while the order runs.
    pub async fn admit(&self, leader: LeaderStamp) -> Result<tokio::sync::MutexGuard<'_, Option<LeaderStamp>>, FenceError> {
        let mut accepted = self.accepted.lock().await;
        match *accepted {
            Some(current) if leader < current => {
                return Err(FenceError::Stale {
                    order: leader,
                    accepted: current,
                })
            }
            Some(current) if leader == current => return Ok(accepted),
            _ => {}
        }
        self.persist(leader)?;
        tracing::info!(term = leader.term, leader = leader.node_id, "accepted newer leader");
        *accepted = Some(leader);
        Ok(accepted)
    }

    pub async fn accepted(&self) -> Option<LeaderStamp> {
        *self.accepted.lock().await
    }

    fn persist(&self, leader: LeaderStamp) -> Result<(), FenceError> {
        let io = |source| FenceError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let mut file = File::create(&tmp).map_err(io)?;
        let json = serde_json::to_vec(&leader).expect("a leader stamp always serializes");
        file.write_all(&json).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(term: u64, node_id: u64) -> LeaderStamp {
        LeaderStamp { term, node_id }
    }

    #[tokio::test]
    async fn older_leader_is_rejected_after_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fence = Fence::open(dir.path()).expect("open");
        drop(fence.admit(stamp(3, 2)).await.expect("first leader admitted"));
        drop(fence);

        let reopened = Fence::open(dir.path()).expect("reopen");
        assert_eq!(reopened.accepted().await, Some(stamp(3, 2)));
        let stale = reopened.admit(stamp(2, 1)).await;
        assert!(matches!(stale, Err(FenceError::Stale { .. })));
        assert!(reopened.admit(stamp(3, 2)).await.is_ok());
        assert!(reopened.admit(stamp(4, 1)).await.is_ok());
        assert!(matches!(reopened.admit(stamp(3, 2)).await, Err(FenceError::Stale { .. })));
    }
}
