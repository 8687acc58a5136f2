//! Manual real-guest check: drives an agent behind QEMU's virtio-serial unix socket.
//!
//! `cargo run -p banger-agent --example guest_check -- /tmp/agent.sock`
//!
//! Pings until the agent answers (printing the time since this program started, which is
//! launched right after QEMU), then runs commands, moves 10 MB, reconnects, and shuts the guest
//! down. Exits non-zero on the first failed check.
//!
//! The guest: an initramfs with the static agent as `/init` (`banger-image`'s `extract` example
//! with INIT = the agent), a base ext4 and an empty overlay ext4, booted with
//! `qemu-system-x86_64 -M microvm -accel tcg -cpu max -m 512 -nodefaults -no-reboot -nographic
//! -kernel vmlinuz -initrd initramfs.cpio.gz -append "console=ttyS0 tsc_early_khz=KHZ panic=-1
//! banger.root=/dev/vda banger.overlay=/dev/vdb banger.hostname=t1" -drive
//! id=d0,file=base.ext4,format=raw,if=none,readonly=on -device virtio-blk-device,drive=d0 -drive
//! id=d1,file=ovl.ext4,format=raw,if=none -device virtio-blk-device,drive=d1 -device
//! virtio-serial-device -chardev socket,id=agent,path=/tmp/agent.sock,server=on,wait=off -device
//! virtserialport,chardev=agent,name=banger.agent` (plus a serial console); QEMU must exit 0.

#[path = "../tests/it/client.rs"]
mod client;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_proto::agent::{AgentRequest, AgentResponse, ExitStatus};
use client::Client;

type Check = Result<(), Box<dyn std::error::Error>>;

fn connect(socket: &Path, start: Instant) -> Result<Client, Box<dyn std::error::Error>> {
    loop {
        match Client::connect(socket) {
            Ok(client) => return Ok(client),
            Err(e) if start.elapsed() < Duration::from_secs(60) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("cannot connect to {}: {e}", socket.display()).into()),
        }
    }
}

/// Pings (a new ping each second; earlier answers are left unread) until one is answered.
fn wait_ready(client: &mut Client, start: Instant) -> Result<AgentResponse, Box<dyn std::error::Error>> {
    client.set_timeout(Duration::from_secs(1))?;
    loop {
        let channel = client.open(&AgentRequest::Ping)?;
        match client.next(channel) {
            Ok(frame) => {
                client.set_timeout(Duration::from_secs(120))?;
                return client::answer(&frame).map_err(Into::into);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
        if start.elapsed() > Duration::from_secs(90) {
            return Err("no pong within 90 s".into());
        }
    }
}

fn expect(cond: bool, what: &str) -> Check {
    if cond {
        println!("ok: {what}");
        Ok(())
    } else {
        Err(format!("FAILED: {what}").into())
    }
}

fn main() -> Check {
    let start = Instant::now();
    let socket = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "/tmp/agent.sock".into()));
    let mut client = connect(&socket, start)?;
    let pong = wait_ready(&mut client, start)?;
    println!("first pong after {:.2?}: {pong:?}", start.elapsed());

    let t = Instant::now();
    let out = client.exec(&["uname", "-r"], None)?;
    println!("uname -r: {} ({:.2?})", String::from_utf8_lossy(&out.stdout).trim(), t.elapsed());
    expect(out.status == Some(ExitStatus { code: 0, signal: None }), "uname exits 0")?;

    let out = client.exec(&["sh", "-c", "exit 7"], None)?;
    expect(out.status.map(|s| s.code) == Some(7), "sh -c 'exit 7' → 7")?;

    let input: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let out = client.exec(&["cat"], Some(&input))?;
    expect(out.stdout == input, "cat returns 800 kB of stdin intact")?;

    let out = client.exec(&["no-such-command"], None)?;
    expect(out.status.map(|s| s.code) == Some(127), "missing command → 127")?;

    let t = Instant::now();
    let out = client.exec(&["sh", "-c", "head -c 10000000 /dev/zero | base64"], None)?;
    let b64 = 10_000_000usize.div_ceil(3) * 4;
    let expected = b64 + b64.div_ceil(76);
    let elapsed = t.elapsed();
    println!(
        "base64 of 10 MB: {} bytes in {elapsed:.2?} ({:.1} MB/s)",
        out.stdout.len(),
        out.stdout.len() as f64 / elapsed.as_secs_f64() / 1e6
    );
    expect(out.stdout.len() == expected, "10 MB base64 output has the expected size")?;

    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let written = client.write_file("/root/blob", 0o640, &data)?;
    expect(written == Ok(AgentResponse::Written { size: data.len() as u64 }), "write_file 2 MB")?;
    let back = client.read_file("/root/blob")?;
    expect(
        back.as_ref()
            .is_ok_and(|(bytes, r)| bytes == &data && *r == AgentResponse::File { size: 2_000_000, mode: 0o640 }),
        "read_file returns it with its mode",
    )?;
    let out = client.exec(&["sh", "-c", "echo data > /etc/banger-test; rm -f /etc/issue; sync"], None)?;
    expect(out.status.map(|s| s.code) == Some(0), "writes and deletes on the overlay root")?;
    let out = client.exec(&["hostname"], None)?;
    println!("hostname: {}", String::from_utf8_lossy(&out.stdout).trim());
    let out = client.exec(&["sh", "-c", "cat /proc/mounts"], None)?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("ports: {:?}", client.call(&AgentRequest::Ports)?);

    // A command left running is killed when the host goes away.
    let channel = client.start(&["sleep", "1000"], false)?;
    let started = client.next(channel)?;
    let Ok(AgentResponse::Started { pid }) = client::answer(&started) else { return Err("no Started".into()) };
    drop(client);
    println!("disconnected with sleep (pid {pid}) running");
    let t = Instant::now();
    let mut client = connect(&socket, Instant::now())?;
    let pong = wait_ready(&mut client, Instant::now())?;
    println!("reconnected, pong after {:.2?}: {pong:?}", t.elapsed());
    let mut gone = false;
    for _ in 0..50 {
        let out = client.exec(&["sh", "-c", &format!("kill -0 {pid} 2>/dev/null")], None)?;
        if out.status.map(|s| s.code) != Some(0) {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    expect(gone, "the disconnected connection's sleep was killed")?;
    let out = client.exec(&["echo", "again"], None)?;
    expect(out.stdout == b"again\n", "exec works after reconnecting")?;

    let t = Instant::now();
    let answer = client.call(&AgentRequest::Shutdown)?;
    expect(answer == Ok(AgentResponse::Ok), "shutdown answered Ok")?;
    println!("shutdown answered after {:.2?}", t.elapsed());
    Ok(())
}
