//! `banger session ...`: supervised processes in a running VM that outlive this client and the
//! daemon (see README, "Sessions").

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::bail;
use banger_core::time::{age, human_duration};
use banger_core::StdinMode;
use banger_proto::{SessionList, SessionRecord, SessionStatus, SessionView, StartSessionRequest};
use clap::{Args, Subcommand};
use hyper::Method;

use super::segment;
use crate::client::Client;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Start a supervised process in a running VM. It keeps running after this command, its
    /// client and even bangerd go away; its stdout and stderr go to log files in the guest.
    /// Exits 1 when the guest refused to launch it (missing working directory or command).
    Start(StartArgs),
    /// List a VM's sessions, their status refreshed from the guest.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one session (by name, id or id prefix).
    Show(RefArgs),
    /// Print a session's stdout log (or stderr with --stderr), following it with --follow.
    Logs(LogsArgs),
    /// Attach to a session: the last 64 KiB of its stdout and stderr logs, then its live output;
    /// for a `--stdin pipe` session, what you type (or pipe in) goes to its stdin. Ctrl-] or
    /// Ctrl-C detaches, and so does the end of stdin for a pipe session; the session keeps
    /// running. A `--tty` session gets this terminal, raw and with its size: every key goes to
    /// it, Ctrl-C included, and only Ctrl-] detaches. Exits with the session's exit code if it
    /// ends while attached, 0 when detached.
    Attach(AttachArgs),
    /// Stop a session: SIGTERM to its process group, then wait for it to end.
    Stop(SignalArgs),
    /// Kill a session: SIGKILL to its process group, then wait for it to end.
    Kill(SignalArgs),
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

fn parse_stdin(text: &str) -> Result<StdinMode, String> {
    StdinMode::parse(text).ok_or_else(|| format!("'{text}' is not a stdin mode; use closed, pipe or tty"))
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  banger session start web --name server -- python3 -m http.server 8000
  banger session start web --name repl --stdin pipe -- python3 -i
  banger session start web --name shell --tty -- bash    (then `banger session attach web shell`)
  banger session start web --cwd /srv --env PORT=8000 --tag team=web -- ./run.sh")]
pub struct StartArgs {
    /// VM: name, id or id prefix.
    vm: String,
    /// The session's name, unique in the VM [default: the command's name and part of the id]
    #[arg(long)]
    name: Option<String>,
    /// `closed` (the process reads /dev/null), `pipe` (attaches write to it) or `tty` (as --tty).
    #[arg(long, default_value = "closed", value_parser = parse_stdin)]
    stdin: StdinMode,
    /// Run it on a terminal (a guest pty, this terminal's size if there is one, else 24x80): its
    /// output, stdout and stderr in one, is the stdout log; `session attach` makes this terminal
    /// raw, types into it and resizes it. Ctrl-] detaches.
    #[arg(long, short = 't', conflicts_with = "stdin")]
    tty: bool,
    /// Working directory in the guest; it must exist [default: /root]
    #[arg(long, short = 'w')]
    cwd: Option<String>,
    /// Environment variable, KEY=VALUE (repeatable).
    #[arg(long, short = 'e', value_parser = parse_pair)]
    env: Vec<(String, String)>,
    /// Label kept with the session, KEY=VALUE (repeatable).
    #[arg(long, value_parser = parse_pair)]
    tag: Vec<(String, String)>,
    /// Print the session as JSON.
    #[arg(long)]
    json: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// VM: name, id or id prefix.
    vm: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct RefArgs {
    /// VM: name, id or id prefix.
    vm: String,
    /// Session: name, id or id prefix.
    session: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// VM: name, id or id prefix.
    vm: String,
    /// Session: name, id or id prefix.
    session: String,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// VM: name, id or id prefix.
    vm: String,
    /// Session: name, id or id prefix.
    session: String,
    /// Keep printing what the session writes until it ends (Ctrl-C stops following).
    #[arg(long, short = 'f')]
    follow: bool,
    /// The stderr log instead of stdout.
    #[arg(long)]
    stderr: bool,
}

#[derive(Debug, Args)]
pub struct SignalArgs {
    /// VM: name, id or id prefix.
    vm: String,
    /// Session: name, id or id prefix.
    session: String,
    /// Seconds to wait for it to end (0: do not wait).
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Print the session as JSON.
    #[arg(long)]
    json: bool,
}

fn base(vm: &str) -> String {
    format!("/v1/vms/{}/sessions", segment(vm))
}

fn one(vm: &str, session: &str) -> String {
    format!("{}/{}", base(vm), segment(session))
}

pub async fn run(client: &Client, command: SessionCommand) -> anyhow::Result<ExitCode> {
    client.ensure_daemon().await?;
    match command {
        SessionCommand::Start(a) => start(client, a).await,
        SessionCommand::List(a) => list(client, a).await,
        SessionCommand::Show(a) => {
            let s: SessionView = client.get(&one(&a.vm, &a.session)).await?;
            show(&s, a.json)
        }
        SessionCommand::Logs(a) => {
            let path = format!("{}/logs?stderr={}&follow={}", one(&a.vm, &a.session), a.stderr, a.follow);
            crate::attach::logs(client, &path).await?;
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Attach(a) => {
            let s: SessionView = client.get(&one(&a.vm, &a.session)).await?;
            crate::attach::attach(client, &s).await
        }
        SessionCommand::Stop(a) => signal(client, a, "stop").await,
        SessionCommand::Kill(a) => signal(client, a, "kill").await,
    }
}

async fn start(client: &Client, a: StartArgs) -> anyhow::Result<ExitCode> {
    let mut words = a.command.into_iter();
    let req = StartSessionRequest {
        name: a.name,
        command: words.next().unwrap_or_default(),
        args: words.collect(),
        cwd: a.cwd,
        env: a.env.into_iter().collect::<BTreeMap<_, _>>(),
        tags: a.tag.into_iter().collect::<BTreeMap<_, _>>(),
        stdin: if a.tty { StdinMode::Tty.into() } else { a.stdin.into() },
        tty_size: (a.tty || a.stdin == StdinMode::Tty).then(crate::tty::size).flatten(),
    };
    let s: SessionView = client.call(Method::POST, &base(&a.vm), Some(&req)).await?;
    if a.json {
        output::json(&s)?;
    }
    let r = &s.record;
    if r.status == SessionStatus::Failed {
        let stage = r.launch_stage.as_deref().unwrap_or("launch");
        let message = r.launch_message.as_deref().or(r.error.as_deref()).unwrap_or("no reason given");
        bail!(
            "session '{}' failed to start at stage '{stage}': {message} (recorded; see `banger session show {} {}`)",
            r.name,
            s.vm,
            r.name
        );
    }
    if !a.json {
        println!("{}", r.name);
        eprintln!(
            "session {} is {} in {} (pid {}); `banger session logs {} {}` shows its output",
            r.name,
            r.status.as_str(),
            s.vm,
            r.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            s.vm,
            r.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `exited 143 (SIGTERM)`, `running`, `failed at cwd`, ...
fn outcome(r: &SessionRecord) -> String {
    match (r.status, r.exit_code, r.exit_signal, &r.launch_stage) {
        (SessionStatus::Exited, Some(code), Some(sig), _) => format!("exited {code} ({})", signal_name(sig)),
        (SessionStatus::Exited, Some(code), None, _) => format!("exited {code}"),
        (SessionStatus::Failed, _, _, Some(stage)) => format!("failed at {stage}"),
        (SessionStatus::Failed, ..) if r.error.is_some() => {
            format!("failed: {}", r.error.as_deref().unwrap_or_default())
        }
        (status, ..) => status.as_str().to_owned(),
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        1 => "SIGHUP".into(),
        2 => "SIGINT".into(),
        9 => "SIGKILL".into(),
        15 => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

async fn list(client: &Client, a: ListArgs) -> anyhow::Result<ExitCode> {
    let list: SessionList = client.get(&base(&a.vm)).await?;
    if a.json {
        output::json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = list
        .sessions
        .iter()
        .map(|s| {
            let r = &s.record;
            vec![
                r.name.clone(),
                r.id.clone(),
                outcome(r),
                r.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                r.stdin_mode.as_str().to_owned(),
                format!("{} ago", human_duration(age(&r.created_at))),
                std::iter::once(&r.command).chain(&r.args).cloned().collect::<Vec<_>>().join(" "),
            ]
        })
        .collect();
    output::table(&["NAME", "ID", "STATUS", "PID", "STDIN", "CREATED", "COMMAND"], &rows)?;
    Ok(ExitCode::SUCCESS)
}

fn show(s: &SessionView, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        output::json(s)?;
        return Ok(ExitCode::SUCCESS);
    }
    let r = &s.record;
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let pairs = |m: &BTreeMap<String, String>| {
        if m.is_empty() {
            "-".to_owned()
        } else {
            m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        }
    };
    output::fields(&[
        ("name", r.name.clone()),
        ("id", r.id.clone()),
        ("vm", s.vm.clone()),
        ("status", outcome(r)),
        ("command", std::iter::once(&r.command).chain(&r.args).cloned().collect::<Vec<_>>().join(" ")),
        ("cwd", r.cwd.clone().unwrap_or_else(|| "/root".into())),
        ("env", pairs(&r.env)),
        ("tags", pairs(&r.tags)),
        ("stdin", r.stdin_mode.as_str().to_owned()),
        ("pid", r.pid.map_or_else(|| "-".into(), |p| p.to_string())),
        ("exit code", r.exit_code.map_or_else(|| "-".into(), |c| c.to_string())),
        ("launch stage", opt(&r.launch_stage)),
        ("launch message", opt(&r.launch_message)),
        ("error", opt(&r.error)),
        ("stdout", s.stdout_path.clone()),
        ("stderr", s.stderr_path.clone()),
        ("created", r.created_at.clone()),
        ("started", opt(&r.started_at)),
        ("ended", opt(&r.ended_at)),
    ])?;
    Ok(ExitCode::SUCCESS)
}

async fn signal(client: &Client, a: SignalArgs, verb: &str) -> anyhow::Result<ExitCode> {
    let path = format!("{}/{verb}?wait_secs={}", one(&a.vm, &a.session), a.timeout);
    let s: SessionView = client.call(Method::POST, &path, None::<&()>).await?;
    if a.json {
        output::json(&s)?;
    } else {
        eprintln!("session {} is {}", s.record.name, outcome(&s.record));
    }
    if !s.record.status.is_terminal() && a.timeout > 0 {
        bail!(
            "session '{}' did not end within {} s; `banger session kill {} {}` ends it for sure",
            s.record.name,
            a.timeout,
            s.vm,
            s.record.name
        );
    }
    Ok(ExitCode::SUCCESS)
}
