//! The services an image declares (`/etc/banger/image.json`, written when the image was made):
//! started at boot, each kept by a thread of its own that restarts it after a failure (backing
//! off from 1 s to 30 s) unless it says `restart = no`. Output goes to
//! `/var/log/banger/NAME.log`; a user other than root is taken on with `runuser`. The same
//! declarations give `exec` its defaults: the image's user, working directory and environment.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use banger_proto::agent::meta::{ImageMeta, ServiceSpec, IMAGE_META_PATH, MAX_IMAGE_META};

use crate::exec::{self, Command, Stdio};

const LOG_DIR: &str = "/var/log/banger";
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The image's declarations, once [`start`] has read them.
static META: OnceLock<ImageMeta> = OnceLock::new();

/// The image's declarations (empty when it has none, or before boot read them).
pub fn image_meta() -> Option<&'static ImageMeta> {
    META.get()
}

/// `exec`'s defaults from the image: `argv` run as the image's user (through `runuser` when
/// that is not root), the image's environment under `env`, and its working directory when the
/// request names none (`/root` otherwise).
pub fn exec_defaults(
    meta: Option<&ImageMeta>,
    argv: Vec<String>,
    env: &[(String, String)],
) -> (Vec<String>, Vec<(String, String)>, PathBuf) {
    let Some(meta) = meta else { return (argv, exec::default_env(env), PathBuf::from("/root")) };
    let mut extra: Vec<(String, String)> =
        meta.env.iter().filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect();
    extra.extend(env.iter().cloned());
    let argv = match meta.user.as_deref().filter(|u| *u != "root" && *u != "0") {
        Some(user) => ["runuser", "-u", user, "--"].iter().map(|s| (*s).to_owned()).chain(argv).collect(),
        None => argv,
    };
    let cwd =
        meta.workdir.as_deref().map(PathBuf::from).filter(|d| d.is_dir()).unwrap_or_else(|| PathBuf::from("/root"));
    (argv, exec::default_env(&extra), cwd)
}

/// Starts the image's services, if it declares any (needs the reaper running).
pub fn start() {
    let meta = match read(Path::new(IMAGE_META_PATH)) {
        Ok(Some(meta)) => META.get_or_init(|| meta),
        Ok(None) => return,
        Err(e) => {
            log!("{IMAGE_META_PATH}: {e}; no services started");
            return;
        }
    };
    if meta.services.is_empty() {
        return;
    }
    if let Err(e) = std::fs::create_dir_all(LOG_DIR) {
        log!("cannot create {LOG_DIR}: {e}");
    }
    for service in &meta.services {
        let command = command(service, meta);
        let (name, restart) = (service.name.clone(), service.restart);
        let spawned =
            std::thread::Builder::new().name(format!("svc-{name}")).spawn(move || supervise(&name, &command, restart));
        if let Err(e) = spawned {
            log!("cannot start service {}: {e}", service.name);
        }
    }
}

/// The declarations at `path`: `None` when there are none; read with a bound.
fn read(path: &Path) -> Result<Option<ImageMeta>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut bytes = Vec::new();
    file.take(MAX_IMAGE_META + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_IMAGE_META {
        return Err(format!("larger than {MAX_IMAGE_META} bytes"));
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| e.to_string())
}

/// `sh -c` with its output appended to the service's log, as its user, in the image's working
/// directory, with the image's and the service's environment.
fn command(service: &ServiceSpec, meta: &ImageMeta) -> Command {
    let log = format!("{LOG_DIR}/{}.log", service.name);
    let user = service.user.as_deref().or(meta.user.as_deref()).filter(|u| *u != "root" && *u != "0");
    let argv: Vec<&str> = match user {
        Some(user) => vec![
            "/bin/sh",
            "-c",
            "exec >>\"$1\" 2>&1 </dev/null; exec runuser -u \"$2\" -- /bin/sh -c \"$3\"",
            "sh",
            &log,
            user,
            &service.command,
        ],
        None => {
            vec!["/bin/sh", "-c", "exec >>\"$1\" 2>&1 </dev/null; exec /bin/sh -c \"$2\"", "sh", &log, &service.command]
        }
    };
    let mut extra: Vec<(String, String)> =
        meta.env.iter().filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect();
    extra.extend(service.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut command = Command::new(&argv);
    command.env = exec::default_env(&extra);
    command.cwd = meta.workdir.as_deref().map_or_else(|| PathBuf::from("/"), PathBuf::from);
    command.stdio = [Stdio::Null; 3];
    command
}

fn supervise(name: &str, command: &Command, restart: bool) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        match exec::run(command) {
            Ok(status) if status.code == 0 => {
                log!("service {name} exited");
                return;
            }
            Ok(status) => log!("service {name} failed (exit {}, signal {:?})", status.code, status.signal),
            Err(e) => log!("service {name} did not start: {e}"),
        }
        if !restart {
            return;
        }
        if started.elapsed() > MAX_BACKOFF {
            backoff = FIRST_BACKOFF;
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_read_with_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.json");
        assert_eq!(read(&path).unwrap(), None, "no file, no services");
        std::fs::write(&path, r#"{"services":[{"name":"web","command":"true"}],"ports":[80]}"#).unwrap();
        let meta = read(&path).unwrap().unwrap();
        assert_eq!((meta.services.len(), meta.ports.as_slice()), (1, &[80u16][..]));
        std::fs::write(&path, vec![b' '; 70 * 1024]).unwrap();
        assert!(read(&path).unwrap_err().contains("larger than"));
    }

    #[test]
    fn exec_takes_the_image_user_workdir_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let meta = ImageMeta {
            user: Some("app".into()),
            workdir: Some(dir.path().display().to_string()),
            env: vec!["A=1".into()],
            ..ImageMeta::default()
        };
        let (argv, env, cwd) = exec_defaults(Some(&meta), vec!["id".into()], &[("B".into(), "2".into())]);
        assert_eq!(argv, ["runuser", "-u", "app", "--", "id"]);
        assert!(env.contains(&("A".into(), "1".into())) && env.contains(&("B".into(), "2".into())));
        assert_eq!(cwd, dir.path());
        let (argv, _, cwd) = exec_defaults(None, vec!["id".into()], &[]);
        assert_eq!((argv, cwd), (vec!["id".to_owned()], PathBuf::from("/root")));
    }

    #[test]
    fn a_service_runs_as_its_user_with_its_environment() {
        let service = ServiceSpec {
            name: "web".into(),
            command: "serve --port 80".into(),
            user: Some("app".into()),
            env: [("MODE".to_owned(), "prod".to_owned())].into(),
            restart: true,
        };
        let meta = ImageMeta { workdir: Some("/srv".into()), env: vec!["A=1".into()], ..ImageMeta::default() };
        let command = command(&service, &meta);
        assert_eq!(&command.argv[4..], ["/var/log/banger/web.log", "app", "serve --port 80"]);
        assert!(command.argv[2].contains("runuser -u"));
        assert_eq!(command.cwd, PathBuf::from("/srv"));
        for pair in [("A", "1"), ("MODE", "prod")] {
            assert!(command.env.contains(&(pair.0.to_owned(), pair.1.to_owned())), "{pair:?}");
        }
    }
}
