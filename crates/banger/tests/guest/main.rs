//! The real-guest tier: real `bangerd`, real QEMU (TCG here), a real Debian kernel and a real
//! image built with mmdebstrap. Runs only with `BANGER_REAL_GUEST=1`; with it set, a missing
//! prerequisite fails the test with the reason.
//!
//! The kernel and the `minimal` image are prepared once into a template state dir under a
//! cache dir (`BANGER_TEST_CACHE`, default `~/.cache/banger-test`), keyed by a version string;
//! each test gets its own daemon and state dir whose artifacts are hard links into the template.

#[path = "../it/harness.rs"]
#[allow(dead_code, reason = "shared with the integration tests; not every helper is used here")]
mod harness;
mod template;

mod balloon;
mod boot;
mod containerd;
mod copy;
mod cri;
mod dockerfile;
mod egress;
mod forward;
mod hostile_disk;
mod hostile_export;
mod hostile_flow;
mod hostile_net;
mod images;
mod mcp;
mod network;
mod recovery;
mod rounds;
mod session;
mod snapshot;
mod ssh;
mod terminal;
mod web;
mod workspace;
