//! The history of one run: every client operation's invocation and
//! completion, and every fault the nemesis started or healed, in the order
//! the harness observed them. Written as JSON lines, one `Op` per line.
//!
//! An operation is a pair of entries with the same `process`: an `invoke`
//! followed by one of `ok` (it happened), `fail` (it certainly did not
//! happen) or `info` (unknown: it may have happened, at any time after its
//! invocation). A process that got `info` never invokes again; the client
//! takes a fresh process id.

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The performer of an operation: a client process or the nemesis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Process {
    Client(u64),
    Nemesis,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// The operation performed, with its arguments and, on completion, its result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Call {
    /// Register read. `value` is `None` on invocation; on `ok` it is the
    /// value read, or `None` when the key has never been written.
    Read { key: String, value: Option<i64> },
    /// Register write.
    Write { key: String, value: i64 },
    /// Register compare-and-set: writes `to` if the key contains `from`. A
    /// mismatch completes as `fail`.
    Cas { key: String, from: i64, to: i64 },
    /// Instance create. `name` is chosen by the client and may collide with
    /// other clients' names on purpose; `id` and `host` are filled on `ok`.
    Create {
        name: String,
        request_id: String,
        id: Option<String>,
        host: Option<String>,
    },
    /// A read of every instance in the zone, on `ok`.
    ListInstances { instances: Option<Vec<InstanceSeen>> },
    /// Tenant network create. Names collide between clients on purpose;
    /// `segmentation_id` (the VLAN id) is filled on `ok`.
    CreateNetwork {
        name: String,
        segmentation_id: Option<u32>,
    },
    /// A read of every network in the zone, on `ok`.
    ListNetworks { networks: Option<Vec<NetworkSeen>> },
    /// A fault the nemesis started (`invoke` then `info` or `ok`) or healed.
    Fault {
        nemesis: String,
        action: FaultAction,
        /// Human-readable target, e.g. "isolate n2 from n1,n3".
        detail: String,
    },
}

/// An instance as a final listing returned it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSeen {
    pub id: String,
    pub name: String,
    pub host: String,
    pub request_id: String,
}

/// A network as a final listing returned it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSeen {
    pub name: String,
    pub segmentation_id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    Start,
    Stop,
}

/// One history entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Position in the history, from 0.
    pub index: u64,
    /// Nanoseconds since the run started, from one monotonic clock.
    pub time_ns: u64,
    pub process: Process,
    #[serde(rename = "type")]
    pub kind: OpType,
    #[serde(flatten)]
    pub call: Call,
    /// Error message of a `fail` or `info` completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    pub fn is_client(&self) -> bool {
        matches!(self.process, Process::Client(_))
    }
}

/// Writes a history as JSON lines.
pub fn write_jsonl(path: &Path, ops: &[Op]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for op in ops {
        serde_json::to_writer(&mut out, op)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads a history written by `write_jsonl`.
pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Op>> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut ops = Vec::new();
    for (number, line) in file.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let op = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("{}:{}: invalid history entry: {e}", path.display(), number + 1))?;
        ops.push(op);
    }
    Ok(ops)
}

/// An invocation paired with its completion. `completion` is `None` when the
/// run ended before the operation completed, which counts as `info`.
#[derive(Clone, Debug)]
pub struct Pair<'a> {
    pub invoke: &'a Op,
    pub completion: Option<&'a Op>,
}

impl Pair<'_> {
    /// Returns the completion type, with a missing completion counted as `info`.
    pub fn outcome(&self) -> OpType {
        self.completion.map_or(OpType::Info, |op| op.kind)
    }
}

/// Pairs each client invocation with the next completion of the same process.
pub fn pairs(ops: &[Op]) -> Vec<Pair<'_>> {
    let mut open: std::collections::HashMap<Process, usize> = std::collections::HashMap::new();
    let mut result: Vec<Pair> = Vec::new();
    for op in ops.iter().filter(|op| op.is_client()) {
        match op.kind {
            OpType::Invoke => {
                open.insert(op.process, result.len());
                result.push(Pair {
                    invoke: op,
                    completion: None,
                });
            }
            _ => {
                if let Some(slot) = open.remove(&op.process) {
                    result[slot].completion = Some(op);
                }
            }
        }
    }
    result
}
