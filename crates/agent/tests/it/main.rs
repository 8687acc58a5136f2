//! Integration tests: the agent binary serving on a unix socket, driven with the proto codec.
//! No VM needed; the real-guest check is `examples/guest_check.rs`.

mod client;
mod serve;
mod session;
mod tty;
mod tunnel;
