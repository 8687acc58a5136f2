//! Contract tests of the Firecracker driver against Firecracker's published API (v1.16.1).
//!
//! Firecracker cannot run on the development hosts (KVM there is nested PVM), so these tests
//! run the driver against a contract server ([`server`]) that checks every request against the
//! shipped spec ([`swagger`]) and answers like Firecracker, reached through a fake `firecracker`
//! executable; see `server.rs`. Every call the driver makes is covered, and so are the error
//! paths: a refused `InstanceStart`, a refusal at each configuration call, a VMM that exits
//! early or dies mid-configuration, and guest faults found in the log.

mod driver;
mod server;
mod swagger;
