//! ccs: a cloud control system. One availability zone is a Raft group of
//! controller replicas that hold the zone's inventory and scheduling state,
//! and an agent on every host that drives libvirt for the zone's leader.
//!
//! Modules, from the bottom up:
//! - `store`: RocksDB-backed Raft log and state machine.
//! - `zone`: the zone's records, commands and deterministic apply.
//! - `raft`: openraft types and the gRPC transport between replicas.
//! - `scheduler`: pure placement of instances on hosts.
//! - `controller`: one replica: Raft node, API service, leader work.
//! - `agent` and `hypervisor`: the host side, behind one libvirt trait.
//! - `client`, `cli`, `dev`: the command line and the local cloud.
#![forbid(unsafe_code)]

pub mod proto {
    pub mod zone {
        tonic::include_proto!("ccs.zone");
    }
    pub mod agent {
        tonic::include_proto!("ccs.agent");
    }
    pub mod raft {
        tonic::include_proto!("ccs.raft");
    }
}

pub mod raft {
    pub mod network;
    pub mod types;
}
pub mod store {
    pub mod db;
    pub mod log_store;
    pub mod state_machine;
}
pub mod zone {
    pub mod apply;
    pub mod command;
    pub mod model;
    pub mod moves;
    pub mod nics;
    pub mod volumes;
}

pub mod client;
pub mod config;
pub mod controller;
pub mod hypervisor;
pub mod scheduler;
pub mod telemetry;
pub mod agent;
pub mod cli;
pub mod demo;
pub mod demo_devices;
pub mod dev;
pub mod bench;
