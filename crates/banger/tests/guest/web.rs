//! The web UI in a real browser against a real daemon and guest: `tests/web/ui.mjs` drives
//! Debian's chromium with Playwright (npm `playwright-core`, installed into web/node_modules by
//! `scripts/build-web`) inside the test's network namespace. It logs in with a `banger web`
//! link, creates a VM from the form and watches its stages, runs `uname -r` in the browser
//! terminal, pauses, resumes and snapshots it, sees each state change live on a dashboard tab left
//! open, stops and deletes the VM, visits the images, kernels, snapshots (deleting the snapshot)
//! and doctor pages, and takes the screenshots the README shows (written to docs/ with
//! `BANGER_UPDATE_SCREENSHOTS=1`, else to a temp dir).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::template::{env_from, template};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn a_browser_logs_in_creates_a_vm_runs_a_terminal_and_sees_it_stop_and_go() {
    let Some(t) = template() else { return };
    let web_dir = repo().join("web");
    assert!(
        web_dir.join("node_modules/playwright-core").is_dir(),
        "real-guest tier: web/node_modules/playwright-core is missing; run scripts/build-web (scripts/test does)"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "real-guest tier: /usr/bin/chromium is missing; run scripts/deps --test"
    );
    let env = env_from(t);
    std::fs::write(env.state.join("config.toml"), "web_listen = \"127.0.0.1:0\"\n").expect("config");
    let login = env.banger(&["web", "--json"]).ok().json();
    let url = login["url"].as_str().expect("url").to_owned();
    let kernels = env.banger(&["kernel", "list", "--json"]).ok().json();
    let release = kernels["kernels"][0]["release"].as_str().expect("release").to_owned();

    let update = std::env::var("BANGER_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1");
    let scratch = tempfile::tempdir().expect("tempdir");
    let shots = if update { repo().join("docs") } else { scratch.path().to_owned() };
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let mut child = env
        .in_netns("node")
        .arg(repo().join("crates/banger/tests/web/ui.mjs"))
        .env("LOGIN_URL", &url)
        .env("VM", "web1")
        .env("IMAGE", "minimal")
        .env("RELEASE", &release)
        .env("SHOTS", &shots)
        .env("WEB_DIR", &web_dir)
        .env("HOME", scratch.path())
        .stdout(out.reopen().expect("reopen"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start node (scripts/deps --test installs it)");
    // Each step in the script has its own deadline; this one bounds the whole run.
    let deadline = Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the browser test") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the browser test did not end within 900 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(out.path()).expect("report");
    assert!(status.success(), "the browser test failed ({status}); its report: {text}");
    let report: serde_json::Value = serde_json::from_str(&text).expect("a JSON report");

    // The create's stages arrived while it ran, through to the agent's answer.
    let stages: Vec<&str> = report["stages"].as_array().expect("stages").iter().filter_map(|s| s.as_str()).collect();
    for stage in ["reserve", "boot", "agent"] {
        assert!(stages.contains(&stage), "stage {stage} not seen: {stages:?}");
    }
    assert_eq!(report["create_state"], "succeeded", "{report}");
    assert_eq!(report["saw_release"], true, "the terminal did not show {release}: {}", report["terminal"]);
    // The dashboard tab, never reloaded, saw the VM come, run, stop and go.
    assert_eq!(report["reloaded"], false);
    let states: Vec<&str> =
        report["dashboard_states"].as_array().expect("states").iter().filter_map(|s| s.as_str()).collect();
    let order = ["running", "paused", "running", "stopped", "absent"];
    let mut at = states.iter().position(|s| *s == "absent").expect("absent at first");
    for want in order {
        at += states[at..].iter().position(|s| *s == want).unwrap_or_else(|| panic!("{want} not seen in {states:?}"));
    }
    // The lists rendered, the snapshot taken from the VM page was deleted from its list, and
    // doctor names where the UI is served.
    assert_eq!(report["lists"], true);
    assert!(report["snapshot"].is_string(), "{report}");
    let snapshots = env.banger(&["snapshot", "list", "--json"]).ok().json();
    assert_eq!(snapshots["snapshots"].as_array().map(Vec::len), Some(0), "{snapshots}");
    let doctor = report["doctor_web"].as_str().unwrap_or_default();
    assert!(doctor.starts_with("serving http://127.0.0.1:") && doctor.contains("loopback only"), "{doctor}");
    for shot in ["web-dashboard.png", "web-vm.png"] {
        let png = std::fs::read(shots.join(shot)).expect("screenshot");
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{shot} is no screenshot");
    }
    let listed = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(listed["vms"].as_array().map(Vec::len), Some(0), "the VM is gone: {listed}");
}
