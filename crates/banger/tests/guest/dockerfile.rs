//! Dockerfile images end to end: buildah builds FROM the template's `minimal` image (no
//! network: RUN steps use only what it has), the image's service runs in the guest and a start
//! returns only once its declared port answers; a failing step and a cancelled build leave
//! nothing behind.

use std::process::Stdio;
use std::time::Duration;

use crate::harness::{wait_until, Env};
use crate::template::{agent_image_enabled, agent_template, env_from, template};

/// A build context with `Dockerfile` (the given text) and `hello.txt`.
fn context(env: &Env, dockerfile: &str) -> std::path::PathBuf {
    let dir = env.dir.path().join("ctx");
    std::fs::create_dir_all(&dir).expect("context dir");
    std::fs::write(dir.join("Dockerfile"), dockerfile).expect("Dockerfile");
    std::fs::write(dir.join("hello.txt"), "copied\n").expect("hello.txt");
    std::fs::write(dir.join("server.pl"), SERVER).expect("server.pl");
    dir
}

/// Nothing of a build is left: no staging directory (buildah's storage lived in one), no
/// image `name`, no mount under the state dir.
fn nothing_left(env: &Env, name: &str) {
    let images = env.state.join("images");
    let leftovers: Vec<String> = std::fs::read_dir(&images)
        .expect("images dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n == name)
        .collect();
    assert!(leftovers.is_empty(), "left in {}: {leftovers:?}", images.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let state = env.state.display().to_string();
    assert!(!mounts.contains(&state), "a mount under the state dir is left: {mounts}");
    env.banger(&["image", "show", name]).fails(1, "no image");
}

/// Whether a live (not zombie) process has `needle` in its command line.
fn process_running(needle: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else { return false };
    dir.filter_map(Result::ok).any(|e| {
        let path = e.path();
        let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        let zombie = stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'));
        !zombie && String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(needle)
    })
}

/// The service: answers each connection with its user, environment and the files RUN and
/// COPY made in its working directory.
const SERVER: &str = r#"use IO::Socket::INET;
my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die "$!";
while (my $c = $s->accept) {
    open my $g, "<", "greet.txt" or die; open my $h, "<", "hello.txt" or die;
    print $c scalar(getpwuid($<)), " $ENV{MOOD} $ENV{EXTRA} ", scalar(<$g>), scalar(<$h>);
    close $c;
}
"#;

const SERVICE: &str = r#"FROM banger/minimal
ARG GREETING=hi
ENV MOOD=sunny
WORKDIR /srv/app
COPY hello.txt server.pl ./
RUN echo "$GREETING $MOOD" > greet.txt && useradd -m -s /bin/sh app && chown -R app /srv/app
USER app
LABEL dev.banger.service.web="sleep 2; exec perl server.pl" dev.banger.service.web.env.EXTRA=extra
LABEL dev.banger.ports=8080
"#;

#[test]
fn a_dockerfile_image_runs_its_service_and_start_waits_for_its_port() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let ctx = context(&env, SERVICE);
    let dockerfile = ctx.join("Dockerfile");
    let built = env.banger(&[
        "image",
        "build",
        "served",
        "--dockerfile",
        dockerfile.to_str().expect("utf-8"),
        "--build-arg",
        "GREETING=hello",
    ]);
    let built = built.ok();
    assert!(built.stderr.contains("built image served"), "{}", built.stderr);
    let shown = env.banger(&["image", "show", "served", "--json"]).ok().json();
    assert!(shown["source"].as_str().is_some_and(|s| s.starts_with("dockerfile:")), "{shown}");
    nothing_left_but_the_image(&env);

    env.banger(&["vm", "create", "svc", "--image", "served"]).ok();
    // The service sleeps before it listens: the start returns only once the port answers, so
    // the very first connection works.
    env.banger(&["vm", "start", "svc"]).ok();
    let probe = "exec 3<>/dev/tcp/127.0.0.1/8080 && cat <&3";
    let answer = env.banger(&["vm", "exec", "svc", "-n", "--", "bash", "-c", probe]).ok();
    assert_eq!(answer.stdout, "app sunny extra hello sunny\ncopied\n", "USER, ENV, env label, ARG+RUN, WORKDIR+COPY");
    // exec takes the image's user, working directory and environment too.
    let defaults = env.banger(&["vm", "exec", "svc", "-n", "--", "sh", "-c", "id -un; pwd; echo $MOOD"]).ok();
    assert_eq!(defaults.stdout, "app\n/srv/app\nsunny\n");
    env.banger(&["vm", "delete", "svc", "--force"]).ok();
}

fn nothing_left_but_the_image(env: &Env) {
    let images = env.state.join("images");
    let scratch: Vec<_> = std::fs::read_dir(&images)
        .expect("images dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(scratch.is_empty(), "scratch left in {}: {scratch:?}", images.display());
}

#[test]
fn a_failing_run_step_fails_the_build_with_its_output_and_leaves_nothing() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let ctx = context(&env, "FROM banger/minimal\nRUN echo before-the-failure && ls /no-such-dir\n");
    let dockerfile = ctx.join("Dockerfile");
    let run = env.banger(&["image", "build", "broken", "--dockerfile", dockerfile.to_str().expect("utf-8")]);
    let run = run.fails(1, "STEP 2/2: RUN echo before-the-failure");
    assert!(run.stderr.contains("/no-such-dir"), "the step's output is in the error: {}", run.stderr);
    assert!(run.stderr.contains("before-the-failure\n"), "the step's output is shown: {}", run.stderr);
    nothing_left(&env, "broken");
}

#[test]
fn a_cancelled_build_leaves_nothing() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    // A token of this test: its RUN step's process is found by it.
    let token = format!("sleep {}", 6000 + std::process::id() % 1000);
    let ctx = context(&env, &format!("FROM banger/minimal\nRUN echo started && {token}\n"));
    let dockerfile = ctx.join("Dockerfile");
    // The daemon runs before the build starts, so the polls below never race it starting one.
    env.banger(&["image", "list"]).ok();
    let mut build = env
        .cmd(&["image", "build", "cancelled", "--dockerfile", dockerfile.to_str().expect("utf-8")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn banger");
    let mut op = String::new();
    wait_until("the RUN step runs", Duration::from_secs(180), || {
        let ops = env.banger(&["op", "list", "--json"]).ok().json();
        let running = ops["operations"].as_array().into_iter().flatten().find(|o| {
            o["kind"] == "image.build"
                && o["state"] == "running"
                && o["stages"].as_array().is_some_and(|s| {
                    s.last().is_some_and(|s| s["name"].as_str().is_some_and(|n| n.contains("RUN echo started")))
                })
        });
        if let Some(o) = running {
            op = o["id"].as_str().unwrap_or_default().to_owned();
        }
        !op.is_empty() && process_running(&token)
    });
    env.banger(&["op", "cancel", &op]).ok();
    let out = wait_for_exit(&mut build);
    assert!(out.contains("cancelled"), "{out}");
    wait_until("the build's processes are gone", Duration::from_secs(30), || !process_running(&token));
    let ops = env.banger(&["op", "list", "--json"]).ok().json();
    let state = ops["operations"].as_array().into_iter().flatten().find(|o| o["id"] == op.as_str());
    assert_eq!(state.map(|o| o["state"].clone()), Some("cancelled".into()), "{ops}");
    nothing_left(&env, "cancelled");
}

/// Waits (bounded) for the CLI to end; returns its stderr.
fn wait_for_exit(child: &mut std::process::Child) -> String {
    let mut exited = None;
    wait_until("the build command ends", Duration::from_secs(60), || {
        exited = child.try_wait().ok().flatten();
        exited.is_some()
    });
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read as _;
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(exited.is_some_and(|s| !s.success()), "a cancelled build fails: {stderr}");
    stderr
}

/// A `docker save`-style tarball of a one-layer image `nested:latest` holding only a static
/// busybox, made here (no registry, no Docker on the host).
fn nested_image_tarball(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("nested-root");
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static is missing; run scripts/deps --test");
    let archive = dir.join("nested");
    std::fs::create_dir_all(archive.join("layer")).expect("mkdir");
    let layer = archive.join("layer/layer.tar");
    let tar = std::process::Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&root)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .status()
        .expect("tar");
    assert!(tar.success());
    let sum = std::process::Command::new("sha256sum").arg(&layer).output().expect("sha256sum");
    let diff_id = String::from_utf8_lossy(&sum.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Cmd": ["/bin/busybox", "echo", "nested-container-ran"] },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
    });
    std::fs::write(archive.join("config.json"), config.to_string()).expect("config");
    let manifest =
        serde_json::json!([{ "Config": "config.json", "RepoTags": ["nested:latest"], "Layers": ["layer/layer.tar"] }]);
    std::fs::write(archive.join("manifest.json"), manifest.to_string()).expect("manifest");
    let out = dir.join("nested.tar");
    let tar = std::process::Command::new("tar")
        .arg("-C")
        .arg(&archive)
        .arg("-cf")
        .arg(&out)
        .args(["manifest.json", "config.json", "layer"])
        .status()
        .expect("tar");
    assert!(tar.success());
    out
}

/// The catalog's `agent` image, built from `images/agent/Dockerfile` (apt and npm on the host)
/// once per machine into a cached template (see [`agent_template`]); every run then makes a VM
/// from it in its own network namespace, without network. `BANGER_AGENT_IMAGE=0` skips it.
#[test]
fn the_agent_image_runs_docker_mise_tmux_and_opencode() {
    let Some(t) = template() else { return };
    if !agent_image_enabled() {
        eprintln!("agent image test off: BANGER_AGENT_IMAGE=0");
        return;
    }
    let (agent, cached) = agent_template(t);
    if cached {
        eprintln!("agent image from the test cache: {}", agent.display());
    }
    let env = env_from(&agent);
    let shown = env.banger(&["image", "show", "agent", "--json"]).ok().json();
    eprintln!("agent image size: {} bytes", shown["size_bytes"]);

    env.banger(&["vm", "create", "agent", "--image", "agent", "--cpus", "2", "--memory", "2G", "--no-network"]).ok();
    let started = std::time::Instant::now();
    env.banger(&["vm", "start", "agent"]).ok();
    eprintln!("agent vm started (port 4096 answering) in {:?}", started.elapsed());
    // The start waited for opencode: its port answers at once.
    let probe = "exec 3<>/dev/tcp/127.0.0.1/4096 && echo open";
    assert_eq!(env.banger(&["vm", "exec", "agent", "-n", "--", "bash", "-c", probe]).ok().stdout, "open\n");
    for (tool, expect) in [("mise --version", ""), ("tmux -V", "tmux "), ("opencode --version", "")] {
        let run = env.banger(&["vm", "exec", "agent", "-n", "--", "bash", "-lc", tool]).ok();
        assert!(run.stdout.contains(expect) && !run.stdout.trim().is_empty(), "{tool}: {}", run.stdout);
    }
    let tarball = nested_image_tarball(env.dir.path());
    env.banger(&["vm", "cp", tarball.to_str().expect("utf-8"), "agent:/root/nested.tar"]).ok();
    let docker = "for i in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
                  docker load -i /root/nested.tar && docker run --rm nested:latest";
    let run = env.banger(&["vm", "exec", "agent", "-n", "--", "bash", "-c", docker]).ok();
    assert!(run.stdout.contains("nested-container-ran"), "{}\n{}", run.stdout, run.stderr);
    env.banger(&["vm", "delete", "agent", "--force"]).ok();
}
