//! The local terminal of `-t`: raw mode held by a guard and restored on every way out (the
//! guard's drop on a return or an error, a panic hook, and the callers' SIGTERM/SIGHUP/SIGQUIT
//! handling through [`terminated`]), its window size, and `SIGWINCH` as a stream of sizes.
//!
//! In raw mode the terminal's line discipline is off: Ctrl-C, Ctrl-Z and Ctrl-\ are bytes sent
//! to the guest's pty (whose line discipline signals the guest's foreground job), not signals
//! to banger.

use std::io::IsTerminal as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Mutex, Once, PoisonError};

use banger_proto::agent::{Frame, FrameKind, TtySize};
use nix::libc;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::signal::unix::{signal, SignalKind};

/// The terminal's mode before raw mode, while raw mode is on: what every way out restores.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// Why the terminal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TtyError {
    /// `-i -t` with stdin that is not a terminal (Docker's "the input device is not a TTY").
    #[error(
        "the input device is not a TTY: -t with stdin needs a terminal; drop -t to pipe stdin \
         (e.g. `banger vm exec VM -- CMD < file`), or run it from a terminal"
    )]
    NotATerminal,
    /// The terminal's mode could not be read or set.
    #[error("cannot put the terminal in raw mode")]
    Mode(#[source] nix::Error),
    /// A signal handler could not be installed.
    #[error("cannot watch for signals")]
    Signal(#[source] std::io::Error),
}

/// Whether stdin is a terminal.
pub fn stdin_is_terminal() -> bool {
    std::io::stdin().is_terminal()
}

/// The window size of the first of stdout, stdin and stderr that is a terminal.
pub fn size() -> Option<TtySize> {
    let fds = [std::io::stdout().as_raw_fd(), std::io::stdin().as_raw_fd(), std::io::stderr().as_raw_fd()];
    fds.into_iter().find_map(|fd| {
        // SAFETY: 0, 1 and 2 stay open for the whole process.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        size_of(fd)
    })
}

/// The window size of terminal `fd` (`None` when it is not one, or reports no size).
pub fn size_of(fd: BorrowedFd<'_>) -> Option<TtySize> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which outlives the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    let size = TtySize { rows: ws.ws_row.min(TtySize::MAX), cols: ws.ws_col.min(TtySize::MAX) };
    (ret == 0 && size.check().is_none()).then_some(size)
}

/// Raw mode on the terminal of stdin until dropped.
#[derive(Debug)]
pub struct RawMode(());

impl RawMode {
    /// Saves the terminal's mode and makes it raw (no echo, no line editing, no signals from
    /// keys, no output processing).
    pub fn enter() -> Result<Self, TtyError> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Err(TtyError::NotATerminal);
        }
        let saved = termios::tcgetattr(stdin.as_fd()).map_err(TtyError::Mode)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        install_panic_hook();
        *SAVED.lock().unwrap_or_else(PoisonError::into_inner) = Some(saved);
        if let Err(e) = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw) {
            restore();
            return Err(TtyError::Mode(e));
        }
        Ok(Self(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts the terminal back as it was before raw mode (nothing when raw mode is off). Safe to
/// call from any way out, more than once.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(saved) = saved {
        // TCSADRAIN: output already written (the guest's last bytes) is shown in raw mode.
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &saved);
    }
}

/// A panic restores the terminal before the message is printed (the process may abort after).
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// The signals that end an attached `-t` client from outside (the terminal closed, a kill):
/// resolves with the signal's number once one arrives. Installed before raw mode is entered,
/// so none is missed.
pub fn terminated() -> Result<impl std::future::Future<Output = i32>, TtyError> {
    let mut term = signal(SignalKind::terminate()).map_err(TtyError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(TtyError::Signal)?;
    let mut quit = signal(SignalKind::quit()).map_err(TtyError::Signal)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
            _ = quit.recv() => libc::SIGQUIT,
        }
    })
}

/// Sends a `Resize` frame (channel 1) on `frames` each time the terminal's size changes
/// (`SIGWINCH`), until `frames` closes.
pub fn send_resizes(frames: tokio::sync::mpsc::UnboundedSender<Frame>) -> Result<(), TtyError> {
    let mut winch = signal(SignalKind::window_change()).map_err(TtyError::Signal)?;
    tokio::spawn(async move {
        let mut last = size();
        while winch.recv().await.is_some() {
            let now = size();
            if now == last {
                continue;
            }
            last = now;
            if let Some(now) = now {
                if frames.send(Frame::json(1, FrameKind::Resize, &now)).is_err() {
                    return;
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pty pair made in the test: the slave stands in for the user's terminal.
    fn pair() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        let ws = nix::pty::Winsize { ws_row: 42, ws_col: 132, ws_xpixel: 0, ws_ypixel: 0 };
        let pty = nix::pty::openpty(Some(&ws), None).expect("openpty");
        (pty.master, pty.slave)
    }

    #[test]
    fn sizes_come_from_the_terminal_and_are_bounded() {
        let (master, slave) = pair();
        assert_eq!(size_of(slave.as_fd()), Some(TtySize { rows: 42, cols: 132 }));
        let huge = libc::winsize { ws_row: 60000, ws_col: 10, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which outlives the call.
        assert_eq!(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &huge) }, 0);
        assert_eq!(size_of(slave.as_fd()), Some(TtySize { rows: TtySize::MAX, cols: 10 }));
        let zero = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &zero) }, 0);
        assert_eq!(size_of(slave.as_fd()), None, "a terminal that reports no size gives none");
        let file = tempfile::tempfile().expect("a file");
        assert_eq!(size_of(file.as_fd()), None, "not a terminal");
    }
}
