//! Console logging: one line per event, prefixed `banger-agent:` and the seconds since boot (the
//! kernel's own clock, so agent and kernel lines compare). In the guest the lines go to
//! /dev/console; elsewhere to stderr. /dev/kmsg is avoided on purpose: it rate-limits userspace.

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

static CONSOLE: OnceLock<Mutex<File>> = OnceLock::new();

/// Sends every later line to `console` instead of stderr.
pub fn to_console(console: File) {
    let _ = CONSOLE.set(Mutex::new(console));
}

/// Seconds since boot, from `CLOCK_BOOTTIME`.
pub fn uptime() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0)
}

/// Writes one line; use `log!`.
pub fn line(args: std::fmt::Arguments<'_>) {
    let text = format!("banger-agent: [{:10.6}] {args}\n", uptime());
    match CONSOLE.get() {
        Some(console) => {
            if let Ok(mut console) = console.lock() {
                let _ = console.write_all(text.as_bytes());
            }
        }
        None => {
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
}

/// Logs a formatted line on the console.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::line(format_args!($($arg)*))
    };
}
