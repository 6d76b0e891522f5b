//! ccs-jepsen: verification of a ccs zone under faults, in the manner of
//! Jepsen. Controllers and agents run as real processes, each in its own
//! network namespace on a bridge the harness creates; clients in the
//! harness record a history; nemeses inject faults; checkers judge the
//! history.
//!
//! Modules:
//! - `history`: the operations of a run and their JSON lines format.
//! - `checker`: linearizability, set, uniqueness and side-effect ledger checks.
//! - `lossyfs`: a FUSE filesystem that drops unsynced writes on a simulated power loss.
//! - `report`: the run's report directory: files, latency plot and index.html.

pub mod checker;
pub mod cluster;
pub mod history;
pub mod lossyfs;
pub mod nemesis;
pub mod netns;
pub mod recorder;
pub mod report;
pub mod run;
pub mod workload;
