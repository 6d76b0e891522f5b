//! openraft's storage test suite against the RocksDB log store and state
//! machine, each case on a fresh database in its own temporary directory.

use ccs::raft::types::{StorageError, TypeConfig};
use ccs::store::{db, log_store::LogStore, state_machine::StateMachine};
use openraft::testing::{StoreBuilder, Suite};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let database = db::open(&dir.path().join("db")).expect("opening RocksDB");
        let log_store = LogStore::new(database.clone());
        let state_machine =
            StateMachine::open(database, &dir.path().join("snapshots")).expect("opening state machine");
        Ok((dir, log_store, state_machine))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(RocksBuilder)?;
    Ok(())
}
