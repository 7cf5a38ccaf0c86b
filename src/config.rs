//! The daemon's configuration: defaults, then the config file, then command-line flags,
//! validated once into an immutable [`Config`]. Secrets are read here and held in
//! [`Secret`], which never prints its value. A [`ConfigSource`] remembers where a
//! config came from, so a reload can build a whole new one the same way.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::yaml::{self, SourceError};

/// A secret value; `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub runs: u64,
    pub days: u64,
    /// How often retention runs besides after each run; zero: only after runs.
    pub interval: Duration,
}

#[derive(Debug, Clone)]
pub struct GithubConfig {
    pub token: Option<Secret>,
    pub api_url: String,
}

/// The GitHub token and the one host it may be offered to.
#[derive(Debug, Clone)]
pub struct HostToken {
    /// `host[:port]`, lower case, as [`https_authority`] gives it.
    pub host: String,
    pub token: Secret,
}

impl HostToken {
    /// The token, if `url` is an https URL on its host.
    pub fn for_url(&self, url: &str) -> Option<&Secret> {
        (https_authority(url).as_deref() == Some(self.host.as_str())).then_some(&self.token)
    }
}

impl GithubConfig {
    /// The token for https clones, bound to the git host of `api_url`.
    pub fn clone_token(&self) -> Option<HostToken> {
        Some(HostToken {
            host: self.git_host()?,
            token: self.token.clone()?,
        })
    }

    /// The host (with its port, if any) that serves git for `api_url`: the only host
    /// an https clone may offer the token to. GitHub's API lives on its own host,
    /// `api.github.com`, and its repositories on `github.com`; an Enterprise server
    /// (`https://HOST/api/v3`) serves both.
    pub fn git_host(&self) -> Option<String> {
        let authority = https_authority(&self.api_url)?;
        Some(match authority.as_str() {
            "api.github.com" => "github.com".to_owned(),
            _ => authority,
        })
    }
}

/// `host[:port]` of an `https://` URL, in lower case; `None` for anything else.
pub fn https_authority(url: &str) -> Option<String> {
    let uri: warp::http::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("https") {
        return None;
    }
    let host = uri.host()?.to_ascii_lowercase();
    Some(match uri.port_u16() {
        Some(port) if port != 443 => format!("{host}:{port}"),
        _ => host,
    })
}

/// Everything `serve` needs, after defaults, file and flags.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub pipelines: PathBuf,
    pub state_dir: PathBuf,
    pub webhook_secret: Option<Secret>,
    pub api_token: Option<Secret>,
    pub max_parallel_runs: usize,
    pub max_body_bytes: u64,
    pub public_url: Option<String>,
    pub step_grace: Duration,
    pub shutdown_grace: Duration,
    pub reconcile_interval: Duration,
    pub secrets_dir: Option<PathBuf>,
    pub retention: Retention,
    pub github: GithubConfig,
    /// Reload when a file in the pipelines directory is created, changed or removed.
    pub watch_pipelines: bool,
}

/// The settings a reload cannot apply: what the running daemon is built around (its
/// socket, its state directory and the lock on it, the directory it watches).
const RESTART_ONLY: &[&str] = &["listen", "state_dir", "pipelines", "watch_pipelines"];

impl Config {
    /// The names of the restart-only settings in which `new` differs from `self`.
    /// Directories are compared as the paths they resolve to, so a relative and an
    /// absolute spelling of the running one are no change.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let same_dir = |a: &Path, b: &Path| {
            a == b
                || matches!(
                    (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                    (Ok(x), Ok(y)) if x == y
                )
        };
        RESTART_ONLY
            .iter()
            .copied()
            .filter(|name| match *name {
                "listen" => self.listen != new.listen,
                "state_dir" => !same_dir(&self.state_dir, &new.state_dir),
                "pipelines" => !same_dir(&self.pipelines, &new.pipelines),
                "watch_pipelines" => self.watch_pipelines != new.watch_pipelines,
                _ => false,
            })
            .collect()
    }

    /// `new` with the restart-only settings of `self`, the running config: what a
    /// reload swaps in.
    pub fn with_restart_only_of(mut self, running: &Config) -> Config {
        self.listen = running.listen;
        self.state_dir.clone_from(&running.state_dir);
        self.pipelines.clone_from(&running.pipelines);
        self.watch_pipelines = running.watch_pipelines;
        self
    }
}

/// Where a config comes from: the file (if any), the command-line flags, and whether
/// unsigned webhooks were allowed; read again as a whole at each reload.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub flags: Overrides,
    pub allow_unsigned: bool,
}

impl ConfigSource {
    /// Reads and validates the whole config, as at start.
    pub fn load(&self, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let file = match &self.path {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let config = Config::build(file, self.flags.clone(), env)?;
        if config.webhook_secret.is_none() && !self.allow_unsigned {
            return Err(ConfigError::NoWebhookSecret);
        }
        Ok(config)
    }

    /// A problem of the config as one line, `file:line:col: message` where it has a
    /// place, else prefixed with the config file's name.
    pub fn describe(&self, error: &ConfigError) -> String {
        match (error, &self.path) {
            (ConfigError::File(e), _) => e.one_line(),
            (ConfigError::Invalid(_) | ConfigError::NoWebhookSecret, Some(path)) => {
                format!("{}: {error}", path.display())
            }
            _ => error.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] SourceError),
    #[error("{path}: cannot read {what}: {source}")]
    SecretFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what} file is empty")]
    EmptySecret { what: &'static str, path: PathBuf },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "no webhook secret: set webhook_secret_file in the config or HOOKCI_WEBHOOK_SECRET \
         (or pass --allow-unsigned for a local trial)"
    )]
    NoWebhookSecret,
}

/// The config file's shape. Unknown keys are typos, hence errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub pipelines: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub webhook_secret_file: Option<PathBuf>,
    pub api_token_file: Option<PathBuf>,
    pub max_parallel_runs: Option<usize>,
    pub max_body_bytes: Option<u64>,
    pub public_url: Option<String>,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub step_grace: Option<Duration>,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub shutdown_grace: Option<Duration>,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub reconcile_interval: Option<Duration>,
    pub secrets_dir: Option<PathBuf>,
    pub retention: Option<FileRetention>,
    pub github: Option<FileGithub>,
    pub watch_pipelines: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetention {
    pub runs: Option<u64>,
    pub days: Option<u64>,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileGithub {
    pub token_file: Option<PathBuf>,
    pub api_url: Option<String>,
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub pipelines: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
}

/// Where secrets come from when no file names them: the process environment.
pub trait EnvSource {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl FileConfig {
    /// Reads a config file; relative paths in it are taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SourceError::whole_file(path, format!("cannot read config file: {e}")))?;
        let mut file: FileConfig = yaml::parse(path, &text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut file.pipelines,
            &mut file.state_dir,
            &mut file.webhook_secret_file,
            &mut file.api_token_file,
            &mut file.secrets_dir,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(t) = file.github.as_mut().and_then(|g| g.token_file.as_mut()) {
            if t.is_relative() {
                *t = base.join(&*t);
            }
        }
        Ok(file)
    }
}

fn read_secret(what: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    // A trailing newline from `echo > file` is not part of the secret.
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(ConfigError::EmptySecret {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(Secret::new(value))
}

fn secret(
    what: &'static str,
    file: Option<&Path>,
    var: &str,
    env: &dyn EnvSource,
) -> Result<Option<Secret>, ConfigError> {
    match file {
        Some(path) => read_secret(what, path).map(Some),
        None => Ok(env.var(var).map(Secret::new)),
    }
}

impl Config {
    /// Defaults, then `file`, then `flags`.
    pub fn build(
        file: FileConfig,
        flags: Overrides,
        env: &dyn EnvSource,
    ) -> Result<Config, ConfigError> {
        let state_dir = flags
            .state_dir
            .or(file.state_dir)
            .or_else(|| {
                env.var("STATE_DIRECTORY")
                    .map(|s| PathBuf::from(s.split(':').next().unwrap_or(&s)))
            })
            .unwrap_or_else(|| PathBuf::from("./.hookci"));
        let github = file.github.unwrap_or_default();
        let retention = file.retention.unwrap_or_default();
        let config = Config {
            listen: flags
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            pipelines: flags
                .pipelines
                .or(file.pipelines)
                .unwrap_or_else(|| PathBuf::from("./pipelines")),
            state_dir,
            webhook_secret: secret(
                "webhook secret",
                file.webhook_secret_file.as_deref(),
                "HOOKCI_WEBHOOK_SECRET",
                env,
            )?,
            api_token: secret(
                "API token",
                file.api_token_file.as_deref(),
                "HOOKCI_API_TOKEN",
                env,
            )?,
            max_parallel_runs: file.max_parallel_runs.unwrap_or(2),
            max_body_bytes: file.max_body_bytes.unwrap_or(25 * 1024 * 1024),
            public_url: file.public_url,
            step_grace: file.step_grace.unwrap_or(Duration::from_secs(5)),
            shutdown_grace: file.shutdown_grace.unwrap_or(Duration::from_secs(60)),
            reconcile_interval: file.reconcile_interval.unwrap_or(Duration::from_secs(300)),
            secrets_dir: file.secrets_dir,
            retention: Retention {
                runs: retention.runs.unwrap_or(1000),
                days: retention.days.unwrap_or(30),
                interval: retention.interval.unwrap_or(Duration::from_secs(600)),
            },
            github: GithubConfig {
                token: match github.token_file {
                    Some(path) => Some(read_secret("GitHub token", &path)?),
                    None => env.var("HOOKCI_GITHUB_TOKEN").map(Secret::new),
                },
                api_url: github
                    .api_url
                    .unwrap_or_else(|| "https://api.github.com".into()),
            },
            watch_pipelines: file.watch_pipelines.unwrap_or(true),
        };
        if config.max_parallel_runs == 0 {
            return Err(ConfigError::Invalid(
                "max_parallel_runs must be at least 1".into(),
            ));
        }
        if config.github.git_host().is_none() {
            return Err(ConfigError::Invalid(format!(
                "github.api_url {:?} is not an https:// URL (for example https://api.github.com, \
                 or https://HOST/api/v3 for GitHub Enterprise)",
                config.github.api_url
            )));
        }
        if config.max_body_bytes == 0 {
            return Err(ConfigError::Invalid(
                "max_body_bytes must be at least 1".into(),
            ));
        }
        Ok(config)
    }
}

/// Where a pipeline's secret `NAME` is looked for, in order: systemd's credentials
/// (`$CREDENTIALS_DIRECTORY/NAME`, from `LoadCredential=`), `secrets_dir/NAME`, then the
/// daemon's variable `HOOKCI_SECRET_NAME`.
pub fn resolve_secret(
    name: &str,
    secrets_dir: Option<&Path>,
    env: &dyn EnvSource,
) -> Result<Secret, String> {
    let mut looked = Vec::new();
    let dirs = env
        .var("CREDENTIALS_DIRECTORY")
        .map(PathBuf::from)
        .into_iter()
        .chain(secrets_dir.map(Path::to_path_buf));
    for dir in dirs {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let value = text.trim_end_matches(['\n', '\r']);
                if value.is_empty() {
                    return Err(format!("secret {name} is empty ({})", path.display()));
                }
                return Ok(Secret::new(value));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                looked.push(path.display().to_string())
            }
            Err(e) => {
                return Err(format!(
                    "secret {name}: cannot read {}: {e}",
                    path.display()
                ))
            }
        }
    }
    let var = format!("HOOKCI_SECRET_{name}");
    if let Some(value) = env.var(&var) {
        return Ok(Secret::new(value));
    }
    looked.push(format!("${var}"));
    Err(format!(
        "secret {name} not found (looked in {})",
        looked.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, &'static str>);

    impl EnvSource for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
    }

    #[test]
    fn defaults_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
        let path = dir.path().join("hookci.yml");
        std::fs::write(
            &path,
            "listen: 127.0.0.1:9000\npipelines: pl\nwebhook_secret_file: secret\nstep_grace: 2s\nretention: { runs: 5, interval: 30s }\n",
        )
        .unwrap();
        let env = FakeEnv(HashMap::from([("HOOKCI_API_TOKEN", "tok")]));
        let flags = Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Overrides::default()
        };
        let c = Config::build(FileConfig::load(&path).unwrap(), flags, &env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:0");
        assert_eq!(c.pipelines, dir.path().join("pl"));
        assert_eq!(c.state_dir, PathBuf::from("./.hookci"));
        assert_eq!(
            c.webhook_secret.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert_eq!(c.api_token.as_ref().map(Secret::expose), Some("tok"));
        assert_eq!(c.step_grace, Duration::from_secs(2));
        assert_eq!(c.shutdown_grace, Duration::from_secs(60));
        assert_eq!(
            c.retention,
            Retention {
                runs: 5,
                days: 30,
                interval: Duration::from_secs(30)
            }
        );
        assert_eq!(c.max_body_bytes, 26_214_400);
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug must not print secrets"
        );
    }

    #[test]
    fn secrets_resolve_from_credentials_then_secrets_dir_then_environment() {
        let creds = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(creds.path().join("A"), "from-credentials\n").unwrap();
        std::fs::write(dir.path().join("A"), "from-dir").unwrap();
        std::fs::write(dir.path().join("B"), "from-dir").unwrap();
        let creds_path: &'static str =
            Box::leak(creds.path().display().to_string().into_boxed_str());
        let env = FakeEnv(HashMap::from([
            ("CREDENTIALS_DIRECTORY", creds_path),
            ("HOOKCI_SECRET_B", "from-env"),
            ("HOOKCI_SECRET_C", "from-env"),
        ]));
        let get = |n| resolve_secret(n, Some(dir.path()), &env).map(|s| s.expose().to_owned());
        assert_eq!(get("A").unwrap(), "from-credentials");
        assert_eq!(get("B").unwrap(), "from-dir");
        assert_eq!(get("C").unwrap(), "from-env");
        let missing = get("D").unwrap_err();
        assert!(
            missing.contains("secret D not found") && missing.contains("$HOOKCI_SECRET_D"),
            "{missing}"
        );
    }

    #[test]
    fn the_github_token_belongs_to_the_git_host_of_the_api() {
        let host = |api_url: &str| {
            GithubConfig {
                token: None,
                api_url: api_url.to_owned(),
            }
            .git_host()
        };
        for (api_url, git_host) in [
            ("https://api.github.com", Some("github.com")),
            ("https://API.GitHub.com/", Some("github.com")),
            ("https://ghe.corp/api/v3", Some("ghe.corp")),
            ("https://ghe.corp:8443/api/v3", Some("ghe.corp:8443")),
            ("https://ghe.corp:443/api/v3", Some("ghe.corp")),
            ("http://ghe.corp/api/v3", None),
            ("api.github.com", None),
            ("", None),
        ] {
            assert_eq!(host(api_url).as_deref(), git_host, "{api_url}");
        }
        let file = FileConfig {
            github: Some(FileGithub {
                token_file: None,
                api_url: Some("http://ghe.corp/api/v3".into()),
            }),
            ..FileConfig::default()
        };
        let err = Config::build(file, Overrides::default(), &FakeEnv(HashMap::new())).unwrap_err();
        assert!(err.to_string().contains("github.api_url"), "{err}");

        let token = GithubConfig {
            token: Some(Secret::new("t0ken")),
            api_url: "https://api.github.com".into(),
        }
        .clone_token()
        .unwrap();
        for (url, offered) in [
            ("https://github.com/o/r.git", true),
            ("https://GitHub.com:443/o/r", true),
            ("https://x@github.com/o/r", true),
            ("http://github.com/o/r.git", false),
            ("https://github.com.evil.example/o/r", false),
            ("https://evil.example/github.com/o/r", false),
            ("https://api.github.com/o/r", false),
            ("/srv/git/r.git", false),
            ("file:///srv/git/r.git", false),
        ] {
            assert_eq!(token.for_url(url).is_some(), offered, "{url}");
        }
    }

    #[test]
    fn a_reload_keeps_the_restart_only_settings_and_names_those_that_changed() {
        let env = FakeEnv(HashMap::new());
        let running = Config::build(FileConfig::default(), Overrides::default(), &env).unwrap();
        assert!(running.watch_pipelines, "watch_pipelines defaults to true");
        let file = FileConfig {
            listen: Some("127.0.0.1:9".parse().unwrap()),
            state_dir: Some("/elsewhere".into()),
            max_parallel_runs: Some(5),
            watch_pipelines: Some(false),
            ..FileConfig::default()
        };
        let new = Config::build(file, Overrides::default(), &env).unwrap();
        assert_eq!(
            running.restart_only_changes(&new),
            ["listen", "state_dir", "watch_pipelines"]
        );
        let swapped = new.with_restart_only_of(&running);
        assert_eq!(swapped.listen, running.listen);
        assert_eq!(swapped.state_dir, running.state_dir);
        assert!(swapped.watch_pipelines);
        assert_eq!(swapped.max_parallel_runs, 5, "the rest takes effect");
        assert!(running.restart_only_changes(&swapped).is_empty());
    }

    #[test]
    fn a_source_without_a_webhook_secret_is_refused_unless_unsigned_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hookci.yml");
        std::fs::write(&path, "max_parallel_runs: 3\n").unwrap();
        let env = FakeEnv(HashMap::new());
        let mut source = ConfigSource {
            path: Some(path.clone()),
            ..ConfigSource::default()
        };
        let err = source.load(&env).unwrap_err();
        assert!(matches!(err, ConfigError::NoWebhookSecret), "{err}");
        let told = source.describe(&err);
        assert!(
            told.starts_with(&format!("{}: no webhook secret", path.display())),
            "{told}"
        );
        source.allow_unsigned = true;
        assert_eq!(source.load(&env).unwrap().max_parallel_runs, 3);

        std::fs::write(&path, "max_parallel_runs: 3\nlisten_addr: x\n").unwrap();
        let told = source.describe(&source.load(&env).unwrap_err());
        let place = format!("{}:2:1: unknown field `listen_addr`", path.display());
        assert!(told.starts_with(&place), "{told}");
        assert!(!told.contains('\n'), "one line: {told}");
    }

    #[test]
    fn state_directory_from_systemd() {
        let env = FakeEnv(HashMap::from([("STATE_DIRECTORY", "/var/lib/hookci")]));
        let c = Config::build(FileConfig::default(), Overrides::default(), &env).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/hookci"));
        assert!(c.webhook_secret.is_none());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_with_places() {
        let dir = tempfile::tempdir().unwrap();
        for (text, place) in [
            (
                "listen: 127.0.0.1:8080\nlisten_addr: x\n",
                ":2:1: unknown field `listen_addr`",
            ),
            ("step_grace: soon\n", ":1:13: bad duration"),
            (
                "github:\n  token: x\n",
                ":2:3: github: unknown field `token`",
            ),
        ] {
            let path = dir.path().join("c.yml");
            std::fs::write(&path, text).unwrap();
            let err = FileConfig::load(&path).unwrap_err().to_string();
            assert!(err.contains(place), "{text:?}: {err}");
        }
        let missing = FileConfig {
            webhook_secret_file: Some(dir.path().join("nope")),
            ..FileConfig::default()
        };
        let err =
            Config::build(missing, Overrides::default(), &FakeEnv(HashMap::new())).unwrap_err();
        assert!(
            err.to_string().contains("cannot read webhook secret"),
            "{err}"
        );
    }
}
