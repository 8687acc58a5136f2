//! Integration tests: a real `bangerd` per test on a temporary state directory, driven through
//! the real `banger` binary (and, for malformed requests, raw HTTP on the socket).

mod bad_input;
mod files;
mod forward;
#[allow(dead_code, reason = "shared with the real-guest tier; not every helper is used here")]
mod harness;
mod lifecycle;
mod mcp;
mod restart;
mod session;
mod snapshot;
mod ssh;
mod web;
mod workspace;
