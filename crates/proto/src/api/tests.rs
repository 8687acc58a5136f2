//! The wire copies say on the wire exactly what the model said before them: each model value,
//! converted, serialises to the same JSON as the model itself.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use super::*;

fn same_json<M: Serialize, W: Serialize + From<M>>(model: M) -> Value {
    let expected = serde_json::to_value(&model).expect("model json");
    let wire = serde_json::to_value(W::from(model)).expect("wire json");
    assert_eq!(wire, expected);
    wire
}

fn vm(state: banger_core::ObservedState) -> banger_core::VmRecord {
    banger_core::VmRecord {
        id: "0123456789abcdef".into(),
        name: "web".into(),
        spec: banger_core::VmSpec {
            image: "debian-bookworm".into(),
            kernel: "debian-6.1-cloud".into(),
            vcpus: 2,
            memory_mib: 1024,
            disk_mib: 4096,
            vmm: banger_core::config::VmmKind::Firecracker,
            network: false,
            allow_vm_traffic: true,
        },
        desired_state: banger_core::DesiredState::Running,
        state,
        guest_ip: Some("172.30.0.2".into()),
        vm_dir: "/s/vms/0123456789abcdef".into(),
        created_at: "t0".into(),
        updated_at: "t1".into(),
        last_error: None,
    }
}

#[test]
fn vms_and_their_paths() {
    use banger_core::ObservedState as S;
    for state in [S::Created, S::Starting, S::Running, S::Paused, S::Stopping, S::Stopped, S::Failed] {
        let wire = same_json::<_, VmRecord>(vm(state));
        assert_eq!(wire["state"], ObservedState::from(state).as_str());
        assert_eq!(ObservedState::from(state).as_str(), state.as_str());
    }
    for desired in [banger_core::DesiredState::Running, banger_core::DesiredState::Stopped] {
        assert_eq!(DesiredState::from(desired).as_str(), desired.as_str());
    }
    let wire = same_json::<_, VmPaths>(vm(S::Running).paths());
    assert_eq!(wire["work_disk"], "/s/vms/0123456789abcdef/work.ext4");
    assert_eq!(VmmKind::from(banger_core::config::VmmKind::Qemu).to_string(), "qemu");
}

#[test]
fn operations_with_stages_and_warnings() {
    let mut op = banger_core::OperationRecord::begin("1".into(), "vm.create", "web");
    op.enter_stage("validate");
    op.enter_stage("guest-files");
    op.warn("~/.npmrc does not exist; skipped");
    let running = OperationRecord::from(op.clone());
    assert_eq!(running.current_stage(), op.current_stage());
    assert_eq!(running.progress(), op.progress());
    same_json::<_, OperationRecord>(op.clone());
    for (state, error) in [
        (banger_core::OpState::Failed, Some("boom".to_owned())),
        (banger_core::OpState::Succeeded, None),
        (banger_core::OpState::Cancelled, None),
        (banger_core::OpState::Interrupted, None),
    ] {
        let mut done = op.clone();
        done.finish(state, error, None);
        let wire = OperationRecord::from(done.clone());
        assert_eq!((wire.state.as_str(), wire.state.is_terminal()), (state.as_str(), state.is_terminal()));
        assert_eq!(wire.current_stage(), None);
        same_json::<_, OperationRecord>(done);
    }
}

#[test]
fn artifacts() {
    same_json::<_, KernelRecord>(banger_core::KernelRecord {
        name: "debian-6.1-cloud".into(),
        version: "6.1.192-2".into(),
        release: "6.1.0-56-cloud-amd64".into(),
        source: "apt:linux-image-cloud-amd64".into(),
        dir: "/s/kernels/k".into(),
        created_at: "t".into(),
    });
    for init_mode in [banger_core::InitMode::Fast, banger_core::InitMode::Systemd] {
        let image = banger_core::ImageRecord {
            name: "minimal".into(),
            source: "recipe:minimal".into(),
            init_mode,
            rootfs: "/s/images/minimal/rootfs.ext4".into(),
            work_seed: None,
            sha256: Some("ab".into()),
            size_bytes: 1 << 30,
            created_at: "t".into(),
        };
        same_json::<_, ImageRecord>(image);
        assert_eq!(banger_core::InitMode::from(InitMode::from(init_mode)), init_mode);
        assert_eq!(InitMode::from(init_mode).as_str(), init_mode.as_str());
    }
}

#[test]
fn snapshots() {
    same_json::<_, SnapshotRecord>(banger_core::SnapshotRecord {
        id: "a".into(),
        name: "s".into(),
        source_vm_id: "b".into(),
        source_vm_name: "web".into(),
        image: "debian-bookworm".into(),
        kernel: "k".into(),
        vcpus: 1,
        memory_mib: 512,
        disk_mib: 2048,
        vmm: banger_core::config::VmmKind::Qemu,
        network: true,
        dir: "/s/snapshots/a".into(),
        size_bytes: 7,
        warm_key: Some("key".into()),
        created_at: "t".into(),
    });
}

#[test]
fn sessions() {
    use banger_core::SessionStatus as S;
    for (status, stdin_mode) in [
        (S::Starting, banger_core::StdinMode::Closed),
        (S::Running, banger_core::StdinMode::Pipe),
        (S::Stopping, banger_core::StdinMode::Closed),
        (S::Exited, banger_core::StdinMode::Closed),
        (S::Failed, banger_core::StdinMode::Pipe),
    ] {
        let record = banger_core::SessionRecord {
            id: "0123456789abcdef".into(),
            vm_id: "fedcba9876543210".into(),
            name: "web".into(),
            command: "sleep".into(),
            args: vec!["60".into()],
            cwd: Some("/srv".into()),
            env: BTreeMap::from([("A".into(), "1".into())]),
            tags: BTreeMap::from([("team".into(), "x".into())]),
            stdin_mode,
            status,
            pid: Some(42),
            exit_code: Some(143),
            exit_signal: Some(15),
            launch_stage: None,
            launch_message: None,
            error: None,
            created_at: "t0".into(),
            started_at: Some("t1".into()),
            ended_at: None,
            updated_at: "t2".into(),
        };
        same_json::<_, SessionRecord>(record);
        let wire = SessionStatus::from(status);
        assert_eq!((wire.as_str(), wire.is_terminal()), (status.as_str(), status.is_terminal()));
        assert_eq!(banger_core::StdinMode::from(StdinMode::from(stdin_mode)), stdin_mode);
        assert_eq!(StdinMode::from(stdin_mode).as_str(), stdin_mode.as_str());
    }
}

#[test]
fn forwards_go_both_ways() {
    for spec in ["8080:80", "0.0.0.0:8443:443", "[::1]:8080:80"] {
        let model = banger_core::PortForward::parse(spec).expect("spec");
        let wire = PortForward::from(model);
        assert_eq!(banger_core::PortForward::from(wire), model);
        assert_eq!(wire.describe("web"), model.describe("web"));
        assert_eq!(wire.protocol.as_str(), model.protocol.as_str());
        same_json::<_, PortForward>(model);
    }
    let sent: PortForward = serde_json::from_value(json!({"host_port": 8080, "guest_port": 80})).expect("json");
    assert_eq!(
        banger_core::PortForward::from(sent),
        banger_core::PortForward::parse("127.0.0.1:8080:80").expect("spec")
    );
    assert!(serde_json::from_value::<PortForward>(json!({"host_port": 1, "guest_port": 1, "extra": 1})).is_err());
}

#[test]
fn the_configuration_and_its_defaults() {
    let model = banger_core::Config {
        vmm: banger_core::config::VmmChoice::Firecracker,
        sync_files: vec!["~/.npmrc".into()],
        jailer_cgroups: vec!["cpu.max=50000 100000".into()],
        ..banger_core::Config::default()
    };
    same_json::<_, Config>(model.clone());
    same_json::<_, Config>(banger_core::Config::default());
    assert_eq!(serde_json::to_value(Config::default()).ok(), serde_json::to_value(banger_core::Config::default()).ok());
    // The CLI prints the wire copy as TOML: the same text the model gives.
    assert_eq!(toml::to_string(&Config::from(model.clone())).ok(), Some(model.to_toml()));
    for choice in [
        banger_core::config::VmmChoice::Auto,
        banger_core::config::VmmChoice::Qemu,
        banger_core::config::VmmChoice::Firecracker,
    ] {
        assert_eq!(banger_core::config::VmmChoice::from(VmmChoice::from(choice)), choice);
    }
}

#[test]
fn doctor_report_keeps_the_shape_of_doctor_json() {
    let report = DoctorReport {
        ok: false,
        checks: vec![DoctorCheck {
            name: "tun".into(),
            status: DoctorStatus::Fail,
            detail: "/dev/net/tun is missing".into(),
            fix: None,
        }],
    };
    let value = serde_json::to_value(&report).expect("serialise");
    assert_eq!(
        value,
        serde_json::json!({
            "ok": false,
            "checks": [{"name": "tun", "status": "fail", "detail": "/dev/net/tun is missing", "fix": null}]
        })
    );
    assert_eq!(serde_json::from_value::<DoctorReport>(value).expect("parse"), report);
}

#[test]
fn a_forward_view_has_the_fields_its_schema_names() {
    let view = ForwardView {
        forward: PortForward {
            host_addr: "127.0.0.1".parse().expect("addr"),
            host_port: 8080,
            guest_port: 80,
            protocol: ForwardProtocol::Tcp,
        },
        vm: "web".into(),
        state: ForwardState::Failed,
        error: Some("address in use".into()),
    };
    let sent: Vec<String> = match serde_json::to_value(&view).expect("json") {
        Value::Object(fields) => fields.keys().cloned().collect(),
        other => panic!("not an object: {other}"),
    };
    let schema = serde_json::to_value(<ForwardView as utoipa::PartialSchema>::schema()).expect("schema json");
    let mut named: Vec<String> = schema["properties"].as_object().expect("properties").keys().cloned().collect();
    named.sort();
    assert_eq!(sent, named, "ForwardViewSchema must name exactly what a ForwardView sends");
    assert_eq!(schema["required"], json!(["host_addr", "host_port", "guest_port", "protocol", "vm", "state"]));
}
