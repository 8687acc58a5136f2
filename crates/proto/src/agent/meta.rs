//! What an image declares for its guests (from Dockerfile labels or a recipe's `labels`),
//! written into the image at [`IMAGE_META_PATH`] for the agent and into the image manifest for
//! the daemon: services the agent starts at boot, ports a start waits for, a default user and
//! working directory.
//!
//! Label keys (the same in a TOML recipe's `[labels]`):
//! - `dev.banger.service.NAME` = shell command (run with `/bin/sh -c`)
//! - `dev.banger.service.NAME.user` = user to run it as [default: the image's user, else root]
//! - `dev.banger.service.NAME.env.KEY` = value
//! - `dev.banger.service.NAME.restart` = `on-failure` (default) or `no`
//! - `dev.banger.ports` = comma-separated guest TCP ports `vm create`/`vm run` wait for
//! - `dev.banger.user`, `dev.banger.workdir` [default: the Dockerfile's `USER`, `WORKDIR`]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where the agent reads an image's metadata in the guest.
pub const IMAGE_META_PATH: &str = "/etc/banger/image.json";
/// Largest metadata file the agent reads.
pub const MAX_IMAGE_META: u64 = 64 * 1024;
/// Prefix of a service label.
pub const SERVICE_LABEL: &str = "dev.banger.service.";

/// An image's declarations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// Services the agent starts at boot, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
    /// Guest TCP ports a start waits for before the VM is reported ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Default user (a name in the image's `/etc/passwd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Default working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The image's environment (`ENV`), `KEY=VALUE`, given to its services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
}

impl ImageMeta {
    /// Whether it declares nothing.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// A service the agent runs at boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Its name (letters, digits, `-`, `_`): its log is `/var/log/banger/NAME.log`.
    pub name: String,
    /// Shell command.
    pub command: String,
    /// User to run it as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Extra environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Restart it when it exits unsuccessfully.
    #[serde(default = "yes")]
    pub restart: bool,
}

fn yes() -> bool {
    true
}

/// Reads the declarations from labels (`dev.banger.*`; others are ignored), with the image's
/// `USER`, `WORKDIR` and `ENV` as defaults. Errors name the label.
pub fn from_labels(
    labels: &BTreeMap<String, String>,
    user: Option<&str>,
    workdir: Option<&str>,
    env: &[String],
) -> Result<ImageMeta, String> {
    let nonempty = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
    let mut meta = ImageMeta {
        user: nonempty(labels.get("dev.banger.user").map(String::as_str)).or_else(|| nonempty(user)),
        workdir: nonempty(labels.get("dev.banger.workdir").map(String::as_str)).or_else(|| nonempty(workdir)),
        env: env.to_vec(),
        ..ImageMeta::default()
    };
    if let Some(ports) = labels.get("dev.banger.ports") {
        for port in ports.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => meta.ports.push(p),
                _ => return Err(format!("dev.banger.ports: '{port}' is not a TCP port")),
            }
        }
    }
    let mut services: BTreeMap<String, ServiceSpec> = BTreeMap::new();
    for (key, value) in labels {
        let Some(rest) = key.strip_prefix(SERVICE_LABEL) else { continue };
        let (name, field) = rest.split_once('.').unwrap_or((rest, ""));
        let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!("{key}: a service name is letters, digits, '-' and '_'"));
        }
        let service = services.entry(name.to_owned()).or_insert_with(|| ServiceSpec {
            name: name.to_owned(),
            restart: true,
            ..ServiceSpec::default()
        });
        match field {
            "" => service.command = value.clone(),
            "user" => service.user = nonempty(Some(value)),
            "restart" => {
                service.restart = match value.as_str() {
                    "on-failure" => true,
                    "no" => false,
                    other => return Err(format!("{key}: '{other}' is not on-failure or no")),
                }
            }
            f => match f.strip_prefix("env.") {
                Some(var) if !var.is_empty() && !var.contains('=') => {
                    service.env.insert(var.to_owned(), value.clone());
                }
                _ => return Err(format!("{key}: unknown service field (command, user, env.KEY, restart)")),
            },
        }
    }
    for service in services.into_values() {
        if service.command.trim().is_empty() {
            return Err(format!("{SERVICE_LABEL}{}: the service has no command", service.name));
        }
        meta.services.push(service);
    }
    Ok(meta)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn labels_declare_services_ports_user_and_workdir() {
        let l = labels(&[
            ("dev.banger.service.web", "python3 -m http.server 8080"),
            ("dev.banger.service.web.user", "app"),
            ("dev.banger.service.web.env.MODE", "prod"),
            ("dev.banger.service.once.restart", "no"),
            ("dev.banger.service.once", "true"),
            ("dev.banger.ports", "8080, 4096"),
            ("io.buildah.version", "1.28.2"),
        ]);
        let meta = from_labels(&l, Some("app"), Some("/srv"), &["A=1".into()]).unwrap();
        assert_eq!(meta.ports, vec![8080, 4096]);
        assert_eq!(meta.user.as_deref(), Some("app"));
        assert_eq!(meta.workdir.as_deref(), Some("/srv"));
        assert_eq!(meta.services.len(), 2);
        let web = meta.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!((web.user.as_deref(), web.restart), (Some("app"), true));
        assert_eq!(web.env.get("MODE").map(String::as_str), Some("prod"));
        assert!(!meta.services.iter().find(|s| s.name == "once").unwrap().restart);
    }

    #[test]
    fn bad_labels_name_the_label() {
        for (key, value) in [
            ("dev.banger.ports", "http"),
            ("dev.banger.ports", "0"),
            ("dev.banger.service.a/b", "x"),
            ("dev.banger.service.web.restart", "always"),
            ("dev.banger.service.web.colour", "x"),
            ("dev.banger.service.nocmd.user", "app"),
        ] {
            let err = from_labels(&labels(&[(key, value)]), None, None, &[]).unwrap_err();
            assert!(err.contains("dev.banger."), "{key}: {err}");
        }
    }
}
