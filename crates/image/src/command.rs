//! Running one host program: arguments, an optional working directory and stdin text, stdout
//! captured, and on failure the end of stderr kept for the error. Shared by the host-tool
//! traits' real implementations.

use std::ffi::OsString;
use std::io::{self, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};

/// Lines of standard error kept for a failed command.
const STDERR_TAIL_LINES: usize = 15;

/// A finished, successful run.
pub(crate) struct Ran {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Why a run did not succeed.
pub(crate) enum RunFailure {
    /// The program is not installed.
    NotFound,
    /// It could not be started or waited for.
    Spawn { command: String, source: io::Error },
    /// It exited unsuccessfully.
    Failed { command: String, status: String, stderr_tail: String },
}

/// Runs `program` with `args` (and `env`), in `cwd`, feeding it `stdin`.
pub(crate) fn run(
    program: &str,
    args: &[OsString],
    env: &[(&str, &str)],
    cwd: Option<&Path>,
    stdin: Option<&str>,
) -> Result<Ran, RunFailure> {
    let command_line = || {
        std::iter::once(program.to_owned())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env("LC_ALL", "C")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    tracing::debug!(command = %command_line(), "running host tool");
    let mut child = command.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => RunFailure::NotFound,
        _ => RunFailure::Spawn { command: command_line(), source },
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes its end; its exit status tells what went wrong.
        let _ = pipe.write_all(text.as_bytes());
    }
    let output = child.wait_with_output().map_err(|source| RunFailure::Spawn { command: command_line(), source })?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let stderr_tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n");
        return Err(RunFailure::Failed { command: command_line(), status: output.status.to_string(), stderr_tail });
    }
    Ok(Ran { stdout: String::from_utf8_lossy(&output.stdout).into_owned(), stderr })
}
