//! Following an operation: polls its status and shows its stages live on stderr with their
//! elapsed times. Quiet when stderr is not a terminal.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::bail;
use banger_core::time::human_duration;
use banger_proto::{OpState, OperationRecord, StageState};
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::Client;

/// Polls operation `op` until it ends; returns its final record, or an error when it failed or
/// was cancelled.
pub async fn follow(client: &Client, mut op: OperationRecord) -> anyhow::Result<OperationRecord> {
    let live = std::io::stderr().is_terminal();
    let mut shown = 0usize;
    let mut warned = 0usize;
    let mut printed = 0usize;
    let mut spinner: Option<ProgressBar> = None;
    loop {
        // Warnings are shown whether or not stderr is a terminal: they are not progress.
        for warning in op.stages.iter().flat_map(|s| &s.warnings).skip(warned) {
            let line = format!("warning: {warning}");
            match &spinner {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
            warned += 1;
        }
        // A tool's output (a Dockerfile build's) is shown as it comes, like warnings.
        for line in op.stages.iter().flat_map(|s| &s.output).skip(printed) {
            match &spinner {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
            printed += 1;
        }
        if live {
            // Print each finished stage once; keep a spinner on the running one.
            for stage in op.stages.iter().skip(shown).filter(|s| s.state != StageState::Running) {
                let line = format!(
                    "{} {} ({})",
                    mark(stage.state),
                    stage.name,
                    human_duration(Duration::from_millis(stage.elapsed_ms))
                );
                match &spinner {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
                shown += 1;
            }
            if let Some(stage) = op.stages.get(shown).filter(|s| s.state == StageState::Running) {
                let bar = spinner.get_or_insert_with(|| {
                    let bar = ProgressBar::new_spinner();
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.enable_steady_tick(Duration::from_millis(100));
                    bar
                });
                bar.set_message(format!(
                    "{} ({})",
                    stage.name,
                    human_duration(Duration::from_millis(stage.elapsed_ms))
                ));
            }
        }
        if op.state.is_terminal() {
            break;
        }
        // A long poll: the daemon answers as soon as a stage or warning is added or the
        // operation ends (or after the wait, which keeps a spinner's elapsed time fresh).
        let seen = op.progress();
        let wait_ms = if live { 500 } else { 5000 };
        let next: OperationRecord = client
            .get(&format!("/v1/operations/{}?wait_ms={wait_ms}&stages={}&warnings={}", op.id, seen.0, seen.1))
            .await?;
        let unchanged = next.progress() == seen && !next.state.is_terminal();
        op = next;
        if unchanged {
            // A daemon that does not long-poll answers at once: do not spin.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if let Some(bar) = spinner {
        bar.finish_and_clear();
    }
    match op.state {
        OpState::Succeeded => Ok(op),
        state => {
            bail!("{} {} {}: {}", op.kind, op.target, state.as_str(), op.error.as_deref().unwrap_or("no reason given"))
        }
    }
}

fn mark(state: StageState) -> &'static str {
    match state {
        StageState::Done => "✓",
        StageState::Failed => "✗",
        StageState::Running => "…",
    }
}
