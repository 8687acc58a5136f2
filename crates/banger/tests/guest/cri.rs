//! Kubernetes pods in banger VMs, driven the way kubelet drives a node: Debian's `containerd`
//! with its CRI plugin on a root, state dir and socket of its own in the test's network
//! namespace (the harness of `containerd.rs`), runtime handler `banger`
//! (`io.containerd.banger.v2`) beside containerd's default `runc`, and the `k8s-cri` crate's CRI
//! v1 client over the unix socket. Nothing can be pulled: the sandbox (pause-like) image and
//! the containers' image are OCI archives the test builds from busybox-static and imports into
//! the `k8s.io` namespace. Pods use the node's network (`NamespaceMode::Node`): no CNI.

use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest, CreateContainerRequest,
    ExecSyncRequest, ImageSpec, ImageStatusRequest, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;

use crate::containerd::{busybox_image, nothing_left, Containerd, IMAGE};
use crate::harness::Env;
use crate::template::{env_from, template};

/// The sandbox image: busybox sleeping until it is killed.
const PAUSE: &str = "docker.io/library/banger-pause:test";
/// How long one pod step may take (TCG boots under load are slow).
const STEP: Duration = Duration::from_secs(300);

/// containerd's CRI configuration: `banger` and `runc` handlers, the test's sandbox image, and
/// an empty CNI config dir of the test's own (host-network pods need none; the host's is not
/// read), and runc's state under the test's dir. `restrict_oom_score_adj`: CRI gives a sandbox an OOM score adjustment of -998, which
/// runc cannot set where root lacks CAP_SYS_RESOURCE (these test machines' root does): its
/// child then dies before exec ("can't get final child's PID from pipe: EOF").
fn cri_tables(cd_dir: &std::path::Path) -> String {
    format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.banger]
      runtime_type = "io.containerd.banger.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{d}/cni"
"#,
        d = cd_dir.display()
    )
}

/// The CRI clients over containerd's socket.
struct Cri {
    /// containerd's log, shown when a call fails.
    log: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl Cri {
    fn connect(socket: std::path::PathBuf, log: std::path::PathBuf) -> Self {
        let rt = tokio::runtime::Runtime::new().expect("tokio");
        let channel = rt.block_on(async {
            tonic::transport::Endpoint::try_from("http://[::]:0")
                .expect("endpoint")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(socket).await?,
                        ))
                    }
                }))
                .await
                .expect("connect to the CRI socket")
        });
        Self { log, rt, runtime: RuntimeServiceClient::new(channel.clone()), images: ImageServiceClient::new(channel) }
    }

    /// `result`'s value, or a panic naming `what` with the end of containerd's log.
    fn ok<T>(&self, what: &str, result: Result<tonic::Response<T>, tonic::Status>) -> T {
        match result {
            Ok(resp) => resp.into_inner(),
            Err(status) => {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<_> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
                panic!("{what}: {status:?}\ncontainerd.log:\n{}", tail.join("\n"));
            }
        }
    }

    /// Waits until the CRI plugin knows `image` (an import reaches it through an event).
    fn wait_image(&mut self, image: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let req = ImageStatusRequest { image: Some(spec(image)), verbose: false };
            let found = self.rt.block_on(self.images.image_status(req)).map(|r| r.into_inner().image.is_some());
            if found.as_ref().is_ok_and(|f| *f) {
                return;
            }
            assert!(Instant::now() < deadline, "the CRI plugin never saw {image}: {found:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// RunPodSandbox of pod `name` with runtime handler `handler` on the node's network.
    fn run_pod(&mut self, name: &str, handler: &str, logs: &std::path::Path) -> (String, PodSandboxConfig) {
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            log_directory: logs.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() };
        let resp = self.rt.block_on(self.runtime.run_pod_sandbox(req));
        let id = self.ok("RunPodSandbox", resp).pod_sandbox_id;
        (id, config)
    }

    /// CreateContainer of `name` running `command` in pod `pod`.
    fn create(&mut self, pod: &(String, PodSandboxConfig), name: &str, command: &[&str]) -> String {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(spec(IMAGE)),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            log_path: format!("{name}.log"),
            ..Default::default()
        };
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.0.clone(),
            config: Some(config),
            sandbox_config: Some(pod.1.clone()),
        };
        let resp = self.rt.block_on(self.runtime.create_container(req));
        self.ok("CreateContainer", resp).container_id
    }

    fn start(&mut self, id: &str) -> Result<(), tonic::Status> {
        let req = StartContainerRequest { container_id: id.into() };
        self.rt.block_on(self.runtime.start_container(req)).map(|_| ())
    }

    fn exec(&mut self, id: &str, cmd: &[&str]) -> (i32, String, String) {
        let req = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: i64::try_from(STEP.as_secs()).unwrap_or(300),
        };
        let resp = self.rt.block_on(self.runtime.exec_sync(req));
        let resp = self.ok("ExecSync", resp);
        (resp.exit_code, String::from_utf8_lossy(&resp.stdout).into(), String::from_utf8_lossy(&resp.stderr).into())
    }

    /// Waits for container `id` to exit; its exit code.
    fn wait_exit(&mut self, id: &str) -> i32 {
        let deadline = Instant::now() + STEP;
        loop {
            let req = ContainerStatusRequest { container_id: id.into(), verbose: false };
            let status = self.rt.block_on(self.runtime.container_status(req)).expect("ContainerStatus").into_inner();
            let status = status.status.expect("a status");
            if status.state == i32::from(ContainerState::ContainerExited) {
                return status.exit_code;
            }
            assert!(Instant::now() < deadline, "container {id} did not exit: {status:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn remove_container(&mut self, id: &str) {
        let req = RemoveContainerRequest { container_id: id.into() };
        self.rt.block_on(self.runtime.remove_container(req)).expect("RemoveContainer");
    }

    /// StopPodSandbox, then RemovePodSandbox.
    fn end_pod(&mut self, id: &str) {
        let stop = StopPodSandboxRequest { pod_sandbox_id: id.into() };
        self.rt.block_on(self.runtime.stop_pod_sandbox(stop)).expect("StopPodSandbox");
        let remove = RemovePodSandboxRequest { pod_sandbox_id: id.into() };
        self.rt.block_on(self.runtime.remove_pod_sandbox(remove)).expect("RemovePodSandbox");
    }
}

fn spec(image: &str) -> ImageSpec {
    ImageSpec { image: image.into(), ..Default::default() }
}

/// A daemon, containerd with CRI, both images imported and seen by the CRI plugin.
fn setup(env: &Env) -> (Containerd<'_>, Cri) {
    env.banger(&["daemon", "start"]).ok();
    let dir = env.dir.path().join("containerd");
    std::fs::create_dir_all(dir.join("cni")).expect("cni dir");
    let cd = Containerd::start_with(env, "[debug]\n  level = \"debug\"\n", &cri_tables(&dir));
    let images = env.dir.path().join("images");
    for (name, cmd) in [(IMAGE, &["sh"][..]), (PAUSE, &["sleep", "2147483647"][..])] {
        let archive = busybox_image(&images, name, cmd);
        cd.ctr(&["-n", "k8s.io", "image", "import", &archive.display().to_string()]).ok();
    }
    let mut cri = Cri::connect(cd.dir.join("containerd.sock"), cd.dir.join("containerd.log"));
    cri.wait_image(IMAGE);
    cri.wait_image(PAUSE);
    (cd, cri)
}

#[test]
fn a_pods_containers_share_its_vm_and_leave_nothing_behind() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let started = Instant::now();
    let (cd, mut cri) = setup(&env);
    let logs = env.dir.path().join("pod-logs");
    std::fs::create_dir_all(&logs).expect("logs");

    let pod = cri.run_pod("web", "banger", &logs);
    let vms = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(vms["vms"].as_array().map(Vec::len), Some(1), "the pod is one VM: {vms}");
    eprintln!("cri: pod sandbox up at {:?}", started.elapsed());

    // A server and a client in the pod: each in a root of its own, one network (localhost).
    let server = cri.create(
        &pod,
        "server",
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello-from-server > /www/index.html && exec busybox httpd -f -p 8080 -h /www",
        ],
    );
    cri.start(&server).expect("StartContainer server");
    let client = cri.create(
        &pod,
        "client",
        &[
            "sh",
            "-c",
            "test -e /www && exit 9; \
         until busybox wget -q -O - http://localhost:8080/; do sleep 0.2; done; \
         until test -e /done; do sleep 0.2; done; exit 3",
        ],
    );
    cri.start(&client).expect("StartContainer client");
    eprintln!("cri: two containers started at {:?}", started.elapsed());

    // A third container does not fit: two spare disk slots per pod VM.
    let third = cri.create(&pod, "third", &["true"]);
    let refused = cri.start(&third).expect_err("a third container is refused");
    assert!(refused.message().contains("at most 2 containers"), "{refused:?}");
    cri.remove_container(&third);

    // ExecSync in the server: its own root, and the server answers on localhost.
    let (code, stdout, stderr) =
        cri.exec(&server, &["sh", "-c", "cat /www/index.html; busybox wget -q -O - http://localhost:8080/"]);
    assert_eq!((code, stdout.as_str()), (0, "hello-from-server\nhello-from-server\n"), "{stderr}");
    let (code, _, _) = cri.exec(&client, &["test", "-e", "/www/index.html"]);
    assert_eq!(code, 1, "the client's root is not the server's");
    let kernels = env.banger(&["kernel", "list", "--json"]).ok().json();
    let release = kernels["kernels"][0]["release"].as_str().expect("release").to_owned();
    let (code, uname, _) = cri.exec(&client, &["uname", "-r"]);
    assert_eq!((code, uname.trim()), (0, release.as_str()), "the pod runs on the guest kernel");

    // The client got the page over localhost, then exits with 3 once told to.
    let (code, _, stderr) = cri.exec(&client, &["touch", "/done"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(cri.wait_exit(&client), 3);
    let log = std::fs::read_to_string(logs.join("client.log")).expect("client log");
    assert!(log.contains("stdout F hello-from-server"), "{log}");
    eprintln!("cri: exec, exit code done at {:?}", started.elapsed());

    // The client's Delete (containerd's, on its exit) freed its slot: another container fits.
    let vm = vms["vms"][0]["id"].as_str().expect("vm id").to_owned();
    let vm_dir = env.state.join("vms").join(&vm);
    crate::harness::wait_until("the client's slot to be freed", STEP, || {
        (0..2).any(|i| std::fs::metadata(vm_dir.join(format!("slot{i}.img"))).is_ok_and(|m| m.len() == 0))
    });
    let again = cri.create(&pod, "again", &["sh", "-c", "exec busybox sleep 1000"]);
    let started_again = cri.start(&again);
    cri.ok("StartContainer again", started_again.map(tonic::Response::new));

    cri.end_pod(&pod.0);
    nothing_left(&env, &cd);
    assert!(!loop_devices_of(&env), "a loop device of the test is left");
    eprintln!("cri: all done in {:?}", started.elapsed());
}

/// Whether a loop device is backed by a file under the test's dir.
fn loop_devices_of(env: &Env) -> bool {
    let out = std::process::Command::new("losetup").arg("-a").output().expect("losetup");
    String::from_utf8_lossy(&out.stdout).contains(&env.dir.path().display().to_string())
}

/// `scripts/bench-cri`: RunPodSandbox to a started container, banger against runc, A/B
/// alternated in one run (`BANGER_CRI_RUNS` pairs); prints each pair and the median ratio.
#[test]
#[ignore = "a benchmark: scripts/bench-cri"]
fn bench_pod_start_banger_against_runc() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let runs: usize = std::env::var("BANGER_CRI_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let (cd, mut cri) = setup(&env);
    let logs = env.dir.path().join("pod-logs");
    std::fs::create_dir_all(&logs).expect("logs");
    let mut ratios = Vec::new();
    for run in 0..runs {
        let order = if run % 2 == 0 { ["banger", "runc"] } else { ["runc", "banger"] };
        let mut took = std::collections::HashMap::new();
        for handler in order {
            let begun = Instant::now();
            let pod = cri.run_pod(&format!("bench-{run}-{handler}"), handler, &logs);
            let ctr = cri.create(&pod, "c", &["sleep", "1000"]);
            let started = cri.start(&ctr);
            cri.ok("StartContainer", started.map(tonic::Response::new));
            took.insert(handler, begun.elapsed().as_secs_f64());
            cri.end_pod(&pod.0);
        }
        let ratio = took["banger"] / took["runc"];
        println!("pair {}: banger {:.3} s, runc {:.3} s, ratio {ratio:.1}", run + 1, took["banger"], took["runc"]);
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    let median = if ratios.len() % 2 == 1 {
        ratios[ratios.len() / 2]
    } else {
        (ratios[ratios.len() / 2 - 1] + ratios[ratios.len() / 2]) / 2.0
    };
    println!(
        "banger/runc, RunPodSandbox to a started container: median {median:.1}x (min {:.1}, max {:.1}) over {runs} pairs",
        ratios[0],
        ratios[ratios.len() - 1]
    );
    nothing_left(&env, &cd);
}
