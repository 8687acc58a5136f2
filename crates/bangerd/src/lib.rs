//! `bangerd`'s library: the services that keep VMs, images, kernels and operations
//! (`services`), the HTTP/JSON edge over them (`http`, the only module that knows HTTP), and
//! the composition root that wires them (`daemon`). `main.rs` only parses arguments, sets up
//! logging and runs these.

pub mod agent_conn;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod failpoint;
pub mod handles;
pub mod http;
pub mod locks;
pub mod ops;
pub mod services;
pub mod tunnel;
