//! Integration tests: a real `bangerd` per test on a temporary state directory, driven through
//! the real `banger` binary (and, for malformed requests, raw HTTP on the socket).

mod bad_input;
mod harness;
mod lifecycle;
mod restart;
