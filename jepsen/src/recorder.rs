//! The recorder that clients and nemeses share: it stamps each entry with
//! the run's one monotonic clock and its position in the history.

use std::sync::Mutex;
use std::time::Instant;

use crate::history::{Call, Op, OpType, Process};

pub struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the run started.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Appends an entry and returns it. The time is taken under the history
    /// lock, so history order and time order agree.
    pub fn record(&self, process: Process, kind: OpType, call: Call, error: Option<String>) -> Op {
        let mut ops = self.ops.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let op = Op {
            index: ops.len() as u64,
            time_ns: self.now_ns(),
            process,
            kind,
            call,
            error,
        };
        ops.push(op.clone());
        op
    }

    /// Returns a copy of the history so far.
    pub fn snapshot(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}
