//! Pseudo-terminals for `tty` execs and sessions: a master the agent keeps (close-on-exec, so
//! no other command inherits it and the slave's last close is seen) and a slave that becomes
//! the command's stdin, stdout, stderr and controlling terminal (`exec::spawn` makes it so:
//! `setsid`, then `TIOCSCTTY`).
//!
//! Reading the master ends with `EIO` once every holder of the slave has closed it; output the
//! command wrote just before it exited is still in the master's buffer then, so the pumps read
//! until `EIO` (bounded by a grace after the exit: a background child may hold the slave).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use banger_proto::agent::TtySize;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// How long output is still read from a pty after its command exited, if something else keeps
/// the slave open (a background job): the grace of a session's pipes.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Why a pty could not be made or changed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}")]
pub struct PtyError {
    /// The step.
    what: &'static str,
    /// Why.
    #[source]
    errno: Errno,
}

fn check(what: &'static str, ret: libc::c_int) -> Result<libc::c_int, PtyError> {
    if ret < 0 {
        Err(PtyError { what, errno: Errno::last() })
    } else {
        Ok(ret)
    }
}

fn winsize(size: TtySize) -> libc::winsize {
    libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 }
}

/// A new pty pair of `size`: (master, slave), both close-on-exec.
pub fn open(size: TtySize) -> Result<(OwnedFd, OwnedFd), PtyError> {
    // SAFETY: a plain open(2) of a NUL-terminated literal path.
    let fd = check("open /dev/ptmx", unsafe {
        libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
    })?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int through the pointer, which outlives the call.
    check("unlock the pty", unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd to the slave.
    let fd = check("open the pty's slave", unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
    })?;
    // SAFETY: the ioctl just returned this fd and nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    resize(master.as_fd(), size)?;
    Ok((master, slave))
}

/// Sets the window size of the pty of `master`; the kernel sends `SIGWINCH` to the slave's
/// foreground process group when it changed.
pub fn resize(master: BorrowedFd<'_>, size: TtySize) -> Result<(), PtyError> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads a `winsize` through the pointer, which outlives the call.
    check("set the terminal size", unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) }).map(|_| ())
}

/// The window size of the terminal `fd`.
#[cfg(test)]
pub fn size(fd: BorrowedFd<'_>) -> Result<TtySize, PtyError> {
    let mut ws = winsize(TtySize { rows: 0, cols: 0 });
    // SAFETY: TIOCGWINSZ writes a `winsize` through the pointer, which outlives the call.
    check("read the terminal size", unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) })?;
    Ok(TtySize { rows: ws.ws_row, cols: ws.ws_col })
}

/// The foreground process group of the terminal of `master` (a shell's running job).
pub fn foreground(master: BorrowedFd<'_>) -> Option<nix::unistd::Pid> {
    nix::unistd::tcgetpgrp(master).ok()
}

/// Reads a pty's master: each chunk goes to `out` until `EIO` (every slave closed), an error,
/// or `out` says stop; once `exited()` says the command has ended, at most [`DRAIN_GRACE`]
/// more (polling, so a slave held open by a background job cannot keep it here).
pub fn pump(master: OwnedFd, exited: impl Fn() -> bool, mut out: impl FnMut(&[u8]) -> bool) {
    let mut file = File::from(master);
    let mut buf = vec![0u8; 64 * 1024];
    let mut deadline: Option<Instant> = None;
    loop {
        if deadline.is_none() && exited() {
            deadline = Some(Instant::now() + DRAIN_GRACE);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return;
        }
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u8)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if !out(&buf[..n]) {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO: the last slave holder closed it; everything written before is read.
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn a_pair_has_its_size_and_follows_resizes() {
        let (master, slave) = open(TtySize { rows: 33, cols: 101 }).expect("pty");
        assert_eq!(size(slave.as_fd()).expect("size"), TtySize { rows: 33, cols: 101 });
        resize(master.as_fd(), TtySize { rows: 7, cols: 9 }).expect("resize");
        assert_eq!(size(slave.as_fd()).expect("size"), TtySize { rows: 7, cols: 9 });
        for fd in [&master, &slave] {
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("flags");
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec");
        }
    }

    /// Everything `pump` passes on, the command having exited.
    fn drain(master: OwnedFd) -> Vec<u8> {
        let mut got = Vec::new();
        pump(
            master,
            || true,
            |b| {
                got.extend_from_slice(b);
                true
            },
        );
        got
    }

    #[test]
    fn the_pump_reads_to_the_end_after_the_slave_closes() {
        let (master, slave) = open(TtySize::DEFAULT).expect("pty");
        let mut writer = File::from(slave);
        writer.write_all(b"last words\n").expect("write");
        drop(writer);
        assert_eq!(drain(master), b"last words\r\n", "written before the close, read after it (ONLCR applies)");
    }

    #[test]
    fn a_held_slave_stops_the_pump_after_the_grace() {
        let (master, slave) = open(TtySize::DEFAULT).expect("pty");
        let mut writer = File::from(slave);
        writer.write_all(b"x").expect("write");
        let started = Instant::now();
        // The command has exited but a background job keeps the slave open (`writer`).
        assert_eq!(drain(master), b"x", "what was there is read");
        assert!(started.elapsed() >= DRAIN_GRACE, "then it waits out the grace, no longer bounded by the slave");
        drop(writer);
    }
}
