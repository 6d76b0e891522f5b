//! The agent's side-effect ledger: one JSON line per order the agent
//! executed (one per step of an emulated migration), in execution order.
//! Verification tools read it to check that no instance ran on two hosts at
//! once and that no order from an older leader ran after a newer leader's
//! order.
//!
//! Each line is written with one `write` call and flushed, so it survives a
//! kill of the agent process but not a power loss of the host.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::zone::model::LeaderStamp;

/// One executed order, or one step of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Wall-clock time the order finished, in nanoseconds since the Unix epoch.
    pub time_unix_ns: u64,
    pub host_id: String,
    pub order_id: u64,
    /// The leader that sent the order.
    pub leader: LeaderStamp,
    /// The newest leader the agent had accepted before this order, if any.
    pub accepted_before: Option<LeaderStamp>,
    /// The instance id, or the volume id of a volume order.
    pub instance_id: String,
    /// "start", "define", "stop", "destroy", "migrate", "create_volume" or
    /// "delete_volume". An emulated migration writes one "migrate" entry
    /// per step on the source host (stopped, then undefined), so the
    /// entries' times show the domain never ran on two hosts at once.
    pub action: String,
    /// State before and after: "running", "stopped" or "absent" for a
    /// domain, "present" or "absent" for a volume.
    pub before: String,
    pub after: String,
}

pub struct Ledger {
    path: PathBuf,
    file: Mutex<File>,
}

impl Ledger {
    /// Opens `path` for appending, creating it if needed.
    pub fn open(path: &Path) -> std::io::Result<Ledger> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Ledger {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// Appends one entry. A failure is logged, not returned: the order has
    /// already run, and the ledger is an audit record, not part of the order.
    pub fn record(&self, entry: &LedgerEntry) {
        let mut line = serde_json::to_vec(entry).expect("a ledger entry always serializes");
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = file.write_all(&line).and_then(|()| file.flush()) {
            tracing::error!(path = %self.path.display(), order_id = entry.order_id, %error, "writing the ledger failed");
        }
    }
}

/// Reads a ledger file. A torn last line, left by a kill during a write, is skipped.
pub fn read(path: &Path) -> anyhow::Result<Vec<LedgerEntry>> {
    let text = std::fs::read_to_string(path)?;
    let mut entries = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (number, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(entry) => entries.push(entry),
            Err(_) if number + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => anyhow::bail!("{}:{}: invalid ledger entry: {e}", path.display(), number + 1),
        }
    }
    Ok(entries)
}
