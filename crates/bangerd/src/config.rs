//! Loading the configuration: the state directory's `config.toml`, else `/etc/banger/config.toml`,
//! else every default.

use std::path::{Path, PathBuf};

use banger_core::config::ConfigError;
use banger_core::Config;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid configuration.
    #[error("invalid config; fix or remove the file")]
    Invalid(#[source] ConfigError),
}

/// Loads the first existing file of `candidates`; returns the config and the file it came from.
pub fn load(candidates: &[PathBuf]) -> Result<(Config, Option<PathBuf>), LoadConfigError> {
    for path in candidates {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let config = Config::from_toml(&text, &path.display().to_string()).map_err(LoadConfigError::Invalid)?;
                return Ok((config, Some(path.clone())));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(LoadConfigError::Read { path: path.display().to_string(), source }),
        }
    }
    Ok((Config::default(), None))
}

/// Shown in `banger config show` for a default config.
pub fn describe_source(source: Option<&Path>) -> Option<String> {
    source.map(|p| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_existing_file_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        std::fs::write(&b, "default_vcpus = 3").expect("write");
        let (c, src) = load(&[a.clone(), b.clone()]).expect("load");
        assert_eq!((c.default_vcpus, src), (3, Some(b.clone())));
        std::fs::write(&a, "default_vcpus = 2").expect("write");
        assert_eq!(load(&[a.clone(), b]).expect("load").0.default_vcpus, 2);
        std::fs::write(&a, "nonsense = [").expect("write");
        assert!(load(&[a]).is_err());
        assert_eq!(load(&[]).expect("defaults").0, Config::default());
    }
}
