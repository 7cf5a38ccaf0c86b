//! The daemon's configuration: defaults, then the config file, then command-line flags,
//! validated once into an immutable [`Config`]. Secrets are read here and held in
//! [`Secret`], which never prints its value. A [`ConfigSource`] remembers where a
//! config came from, so a reload can build a whole new one the same way.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::run::uids::UidRange;
use crate::run::user::RunAs;
use crate::store::postgres::PgTarget;
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
    /// `github.statuses`: post commit statuses when a token is set (default true).
    pub statuses: bool,
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
    /// The token commit statuses are posted with: set, and statuses not turned off.
    pub fn status_token(&self) -> Option<&Secret> {
        self.token.as_ref().filter(|_| self.statuses)
    }

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

/// Whether `url` may serve as the API's base: an https URL, or a plain http one on
/// the loopback host (a test's or a trial's fake API). Over http only the API client
/// talks to it; a clone never offers the token there ([`GithubConfig::git_host`]
/// takes https only).
pub fn api_url_ok(url: &str) -> bool {
    if https_authority(url).is_some() {
        return true;
    }
    let Ok(uri) = url.parse::<warp::http::Uri>() else {
        return false;
    };
    uri.scheme_str() == Some("http")
        && matches!(
            uri.host().map(str::to_ascii_lowercase).as_deref(),
            Some("127.0.0.1" | "localhost" | "[::1]")
        )
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
    /// When set, pages and the read API need it (or the API token).
    pub read_token: Option<Secret>,
    pub max_parallel_runs: usize,
    pub max_body_bytes: u64,
    pub public_url: Option<String>,
    pub step_grace: Duration,
    pub shutdown_grace: Duration,
    /// How long a running run stays this instance's without a renewal, on a shared
    /// database; renewed every third of it.
    pub lease: Duration,
    pub reconcile_interval: Duration,
    pub secrets_dir: Option<PathBuf>,
    pub retention: Retention,
    pub github: GithubConfig,
    /// The user every step runs as; `None`: the daemon's own.
    pub run_as: Option<RunAs>,
    /// With `run_as`: each run at once gets a uid of its own from this range, with
    /// `run_as`'s groups (see `run::uids`).
    pub run_as_uids: Option<UidRange>,
    /// Per run; zero: no limit.
    pub max_log_bytes: u64,
    /// Below this much free space in the state directory's file system no run starts.
    pub min_free_bytes: u64,
    pub max_connections: usize,
    /// Body bytes all connections together may hold before their signature is checked.
    pub max_unverified_bytes: u64,
    /// How long a connection with no request in flight may send nothing before it is
    /// closed. Read per connection: a reload applies to the connections that follow.
    pub keep_alive_timeout: Duration,
    /// The config file and the secret files and folders: with `run_as`, none of them
    /// may be readable by that user (`serve` refuses to start otherwise).
    pub protected: Vec<PathBuf>,
    /// What pipeline secrets may come from in the daemon's environment, read once at
    /// load: the variables themselves are removed from the process (see
    /// [`scrub_environment`]).
    pub secret_env: SecretEnv,
    /// Reload when a file in the pipelines directory is created, changed or removed.
    pub watch_pipelines: bool,
    /// The shared PostgreSQL store (`database:` or `$HOOKCI_DATABASE_URL`); `None`:
    /// SQLite in `state_dir`.
    pub database: Option<PgTarget>,
}

/// The settings a reload cannot apply: what the running daemon is built around (its
/// socket, its state directory and the lock on it, the directory it watches), the
/// HTTP limits sized when it starts (the body budget must hold the largest body), and
/// `run_as`, whose checks (the state directory and secrets closed to that user, the
/// rights to switch to it) are made at start.
const RESTART_ONLY: &[&str] = &[
    "listen",
    "state_dir",
    "pipelines",
    "watch_pipelines",
    "run_as",
    "run_as_uids",
    "max_connections",
    "max_unverified_bytes",
    "max_body_bytes",
    "database",
];

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
                "run_as" => self.run_as != new.run_as,
                "run_as_uids" => self.run_as_uids != new.run_as_uids,
                "max_connections" => self.max_connections != new.max_connections,
                "max_unverified_bytes" => self.max_unverified_bytes != new.max_unverified_bytes,
                "max_body_bytes" => self.max_body_bytes != new.max_body_bytes,
                "database" => self.database != new.database,
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
        self.run_as.clone_from(&running.run_as);
        self.run_as_uids = running.run_as_uids;
        self.max_connections = running.max_connections;
        self.max_unverified_bytes = running.max_unverified_bytes;
        self.max_body_bytes = running.max_body_bytes;
        self.database.clone_from(&running.database);
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
        let mut config = Config::build(file, self.flags.clone(), env)?;
        if config.webhook_secret.is_none() && !self.allow_unsigned {
            return Err(ConfigError::NoWebhookSecret);
        }
        config.protected.extend(self.path.clone());
        Ok(config)
    }

    /// A problem of the config as one line, `file:line:col: message` where it has a
    /// place (a value checked after parsing is placed at its key), else prefixed with
    /// the config file's name.
    pub fn describe(&self, error: &ConfigError) -> String {
        if let ConfigError::File(e) = error {
            return e.one_line();
        }
        let Some(path) = &self.path else {
            return error.to_string();
        };
        let place = error.key().and_then(|key| {
            let text = std::fs::read_to_string(path).ok()?;
            yaml::find_key(&text, key)
        });
        match (place, error) {
            (Some((line, column)), _) => format!("{}:{line}:{column}: {error}", path.display()),
            (
                None,
                ConfigError::Invalid(_)
                | ConfigError::InvalidValue { .. }
                | ConfigError::NoWebhookSecret,
            ) => {
                format!("{}: {error}", path.display())
            }
            (None, _) => error.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] SourceError),
    #[error("{path}: cannot read {what}: {source}")]
    SecretFile {
        /// The config key that names the file; empty when no key does.
        key: &'static str,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what} file is empty")]
    EmptySecret {
        key: &'static str,
        what: &'static str,
        path: PathBuf,
    },
    #[error("{0}")]
    Invalid(String),
    /// A value the file's shape allows but hookci does not; `key` is its place, dotted
    /// below the top level (`retention.runs`).
    #[error("{message}")]
    InvalidValue { key: &'static str, message: String },
    #[error(
        "no webhook secret: set webhook_secret_file in the config or HOOKCI_WEBHOOK_SECRET \
         (or pass --allow-unsigned for a local trial)"
    )]
    NoWebhookSecret,
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            key,
            message: message.into(),
        }
    }

    /// The config key the problem is about, where it has one.
    fn key(&self) -> Option<&'static str> {
        match self {
            ConfigError::SecretFile { key, .. }
            | ConfigError::EmptySecret { key, .. }
            | ConfigError::InvalidValue { key, .. } => Some(*key).filter(|k| !k.is_empty()),
            ConfigError::File(_) | ConfigError::Invalid(_) | ConfigError::NoWebhookSecret => None,
        }
    }
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
    pub read_token_file: Option<PathBuf>,
    pub max_parallel_runs: Option<usize>,
    pub max_body_bytes: Option<u64>,
    pub public_url: Option<String>,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub step_grace: Option<Duration>,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub shutdown_grace: Option<Duration>,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub lease: Option<Duration>,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub reconcile_interval: Option<Duration>,
    pub secrets_dir: Option<PathBuf>,
    pub retention: Option<FileRetention>,
    pub github: Option<FileGithub>,
    pub run_as: Option<String>,
    pub run_as_uids: Option<String>,
    pub max_log_bytes: Option<u64>,
    pub min_free_bytes: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_unverified_bytes: Option<u64>,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub keep_alive_timeout: Option<Duration>,
    pub watch_pipelines: Option<bool>,
    pub database: Option<String>,
    pub database_password_file: Option<PathBuf>,
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
    pub statuses: Option<bool>,
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
    /// A secret variable [`scrub_environment`] removed still reads as it was: a config
    /// built again (a reload) finds what the first one did.
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name)
            .ok()
            .or_else(|| scrubbed().get(name).map(|s| s.expose().to_owned()))
            .filter(|v| !v.is_empty())
    }
}

/// The secret variables removed from the process environment, with their values.
static SCRUBBED: std::sync::Mutex<std::collections::BTreeMap<String, Secret>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn scrubbed() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<String, Secret>> {
    SCRUBBED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The prefix of the variables that hold pipeline secrets.
pub const SECRET_VAR_PREFIX: &str = "HOOKCI_SECRET_";

/// The daemon's own secrets that may come from its environment.
const SECRET_VARS: [&str; 5] = [
    "HOOKCI_WEBHOOK_SECRET",
    "HOOKCI_API_TOKEN",
    "HOOKCI_GITHUB_TOKEN",
    "HOOKCI_READ_TOKEN",
    "HOOKCI_DATABASE_URL",
];

/// The environment a pipeline secret may be resolved from, captured once when the
/// config is built: `$CREDENTIALS_DIRECTORY` and every `HOOKCI_SECRET_*` variable.
#[derive(Debug, Clone, Default)]
pub struct SecretEnv {
    credentials_dir: Option<String>,
    vars: std::collections::BTreeMap<String, Secret>,
}

impl SecretEnv {
    /// Captures what `resolve_secret` may look at. `names` lists the variables present
    /// (the process environment's names; a test's fake environment gives its own).
    pub fn capture<'a>(env: &dyn EnvSource, names: impl IntoIterator<Item = &'a str>) -> SecretEnv {
        SecretEnv {
            credentials_dir: env.var("CREDENTIALS_DIRECTORY"),
            vars: names
                .into_iter()
                .filter(|n| n.starts_with(SECRET_VAR_PREFIX))
                .filter_map(|n| Some((n.to_owned(), Secret::new(env.var(n)?))))
                .collect(),
        }
    }
}

impl EnvSource for SecretEnv {
    fn var(&self, name: &str) -> Option<String> {
        if name == "CREDENTIALS_DIRECTORY" {
            return self.credentials_dir.clone();
        }
        self.vars.get(name).map(|s| s.expose().to_owned())
    }
}

/// The names of the process environment's variables (those scrubbed included).
pub fn process_env_names() -> Vec<String> {
    let mut names: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .collect();
    names.extend(scrubbed().keys().cloned());
    names
}

/// Removes every secret variable from the process environment, once the config holds
/// what it needs of them: a step, the git worker or anything else the daemon starts
/// never inherits one, and nothing that prints the environment finds one. Call it
/// before any thread starts (changing the environment is not thread-safe).
pub fn scrub_environment() {
    for (name, value) in std::env::vars_os() {
        let (Ok(name), Ok(value)) = (name.into_string(), value.into_string()) else {
            continue;
        };
        if SECRET_VARS.contains(&name.as_str()) || name.starts_with(SECRET_VAR_PREFIX) {
            std::env::remove_var(&name);
            scrubbed().insert(name, Secret::new(value));
        }
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
            &mut file.read_token_file,
            &mut file.secrets_dir,
            &mut file.database_password_file,
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

/// The `state_dir` a config file sets, resolved as [`FileConfig::load`] does, and
/// nothing else of it read or checked: `hookci reload --local` must find the daemon of
/// a config that may be broken, which the reload it asks for is there to report.
pub fn state_dir_in(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
    let dir = PathBuf::from(value.get("state_dir")?.as_str()?);
    Some(match path.parent() {
        Some(base) if dir.is_relative() => base.join(dir),
        _ => dir,
    })
}

/// `key`: the config key that names the file (empty when none does).
fn read_secret(key: &'static str, what: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        key,
        what,
        path: path.to_path_buf(),
        source,
    })?;
    // A trailing newline from `echo > file` is not part of the secret.
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(ConfigError::EmptySecret {
            key,
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(Secret::new(value))
}

fn secret(
    key: &'static str,
    what: &'static str,
    file: Option<&Path>,
    var: &str,
    env: &dyn EnvSource,
) -> Result<Option<Secret>, ConfigError> {
    match file {
        Some(path) => read_secret(key, what, path).map(Some),
        None => Ok(env.var(var).map(Secret::new)),
    }
}

/// The PostgreSQL store, if one is named: `database:` in the file, else
/// `$HOOKCI_DATABASE_URL`. Its password, when not in the URL: `database_password_file`,
/// else systemd's credential `database-password`.
fn database(
    url: Option<&str>,
    password_file: Option<&Path>,
    env: &dyn EnvSource,
) -> Result<Option<PgTarget>, ConfigError> {
    let Some(url) = url
        .map(str::to_owned)
        .or_else(|| env.var("HOOKCI_DATABASE_URL"))
    else {
        return Ok(None);
    };
    let password = match password_file {
        Some(path) => Some(read_secret(
            "database_password_file",
            "database password",
            path,
        )?),
        None => env
            .var("CREDENTIALS_DIRECTORY")
            .map(|dir| Path::new(&dir).join("database-password"))
            .filter(|path| path.exists())
            // Not from the file: no key to place it at.
            .map(|path| read_secret("", "database password", &path))
            .transpose()?,
    };
    PgTarget::parse(&url, password.as_ref().map(Secret::expose))
        .map(Some)
        .map_err(|message| ConfigError::invalid("database", message))
}

impl Config {
    /// Defaults, then `file`, then `flags`.
    pub fn build(
        file: FileConfig,
        flags: Overrides,
        env: &dyn EnvSource,
    ) -> Result<Config, ConfigError> {
        let names = process_env_names();
        Config::build_with(file, flags, env, names.iter().map(String::as_str))
    }

    /// [`Config::build`], with the names of the variables `env` holds.
    pub fn build_with<'a>(
        file: FileConfig,
        flags: Overrides,
        env: &dyn EnvSource,
        env_names: impl IntoIterator<Item = &'a str>,
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
        let protected = [
            file.webhook_secret_file.clone(),
            file.api_token_file.clone(),
            github.token_file.clone(),
            file.secrets_dir.clone(),
            file.database_password_file.clone(),
            env.var("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        ]
        .into_iter()
        .flatten()
        .collect();
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
                "webhook_secret_file",
                "webhook secret",
                file.webhook_secret_file.as_deref(),
                "HOOKCI_WEBHOOK_SECRET",
                env,
            )?,
            api_token: secret(
                "api_token_file",
                "API token",
                file.api_token_file.as_deref(),
                "HOOKCI_API_TOKEN",
                env,
            )?,
            read_token: secret(
                "read_token_file",
                "read token",
                file.read_token_file.as_deref(),
                "HOOKCI_READ_TOKEN",
                env,
            )?,
            max_parallel_runs: file.max_parallel_runs.unwrap_or(2),
            max_body_bytes: file.max_body_bytes.unwrap_or(25 * 1024 * 1024),
            public_url: file.public_url,
            step_grace: file.step_grace.unwrap_or(Duration::from_secs(5)),
            shutdown_grace: file.shutdown_grace.unwrap_or(Duration::from_secs(60)),
            lease: file.lease.unwrap_or(Duration::from_secs(15)),
            reconcile_interval: file.reconcile_interval.unwrap_or(Duration::from_secs(300)),
            secrets_dir: file.secrets_dir,
            retention: Retention {
                runs: retention.runs.unwrap_or(1000),
                days: retention.days.unwrap_or(30),
                interval: retention.interval.unwrap_or(Duration::from_secs(600)),
            },
            github: GithubConfig {
                token: match github.token_file {
                    Some(path) => Some(read_secret("github.token_file", "GitHub token", &path)?),
                    None => env.var("HOOKCI_GITHUB_TOKEN").map(Secret::new),
                },
                api_url: github
                    .api_url
                    .unwrap_or_else(|| "https://api.github.com".into()),
                statuses: github.statuses.unwrap_or(true),
            },
            run_as: match file.run_as {
                Some(user) => Some(
                    RunAs::resolve(&user)
                        .map_err(|message| ConfigError::invalid("run_as", message))?,
                ),
                None => None,
            },
            run_as_uids: match file.run_as_uids {
                Some(range) => Some(
                    UidRange::parse(&range)
                        .map_err(|message| ConfigError::invalid("run_as_uids", message))?,
                ),
                None => None,
            },
            max_log_bytes: file.max_log_bytes.unwrap_or(100 * 1024 * 1024),
            min_free_bytes: file.min_free_bytes.unwrap_or(1024 * 1024 * 1024),
            max_connections: file.max_connections.unwrap_or(1024),
            max_unverified_bytes: file.max_unverified_bytes.unwrap_or(64 * 1024 * 1024),
            keep_alive_timeout: file.keep_alive_timeout.unwrap_or(Duration::from_secs(15)),
            protected,
            secret_env: SecretEnv::capture(env, env_names),
            watch_pipelines: file.watch_pipelines.unwrap_or(true),
            database: database(
                file.database.as_deref(),
                file.database_password_file.as_deref(),
                env,
            )?,
        };
        if config.max_connections == 0 {
            return Err(ConfigError::invalid(
                "max_connections",
                "max_connections must be at least 1",
            ));
        }
        if config.lease < Duration::from_secs(1) {
            // Renewed every third of it: shorter would be a database write loop.
            return Err(ConfigError::invalid("lease", "lease must be at least 1s"));
        }
        if config.database.is_some() && config.step_grace > config.lease / 3 {
            // An instance that cannot renew stops its steps a third of the lease before it
            // lapses; a longer grace would let them run on while another instance runs
            // the run again.
            return Err(ConfigError::invalid(
                "step_grace",
                format!(
                    "step_grace ({:?}) must be at most a third of lease ({:?}) with a shared database",
                    config.step_grace,
                    config.lease
                ),
            ));
        }
        if config.keep_alive_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "keep_alive_timeout",
                "keep_alive_timeout must be more than 0s",
            ));
        }
        if config.max_unverified_bytes < config.max_body_bytes {
            // A body the budget can never hold would get 503 for ever, and GitHub does
            // not retry.
            return Err(ConfigError::invalid(
                "max_unverified_bytes",
                format!(
                    "max_unverified_bytes ({}) must be at least max_body_bytes ({}), so that \
                 the largest webhook fits",
                    config.max_unverified_bytes, config.max_body_bytes
                ),
            ));
        }
        if config.max_parallel_runs == 0 {
            return Err(ConfigError::invalid(
                "max_parallel_runs",
                "max_parallel_runs must be at least 1",
            ));
        }
        if let Some(range) = &config.run_as_uids {
            if config.run_as.is_none() {
                return Err(ConfigError::invalid(
                    "run_as_uids",
                    "run_as_uids needs run_as: the user whose name and groups the steps get",
                ));
            }
            if let Some(who) = config.run_as.as_ref().filter(|w| range.holds(w.uid)) {
                return Err(ConfigError::invalid(
                    "run_as_uids",
                    format!(
                        "run_as_uids holds uid {}, run_as's own: its runs would share it",
                        who.uid
                    ),
                ));
            }
            if range.count() < config.max_parallel_runs {
                return Err(ConfigError::invalid(
                    "run_as_uids",
                    format!(
                        "run_as_uids holds {} uids, fewer than max_parallel_runs ({}): runs at \
                         once would have to share one",
                        range.count(),
                        config.max_parallel_runs
                    ),
                ));
            }
        }
        if config.retention.runs == 0 {
            return Err(ConfigError::invalid(
                "retention.runs",
                "retention.runs must be at least 1 (the newest finished runs to keep)",
            ));
        }
        if !api_url_ok(&config.github.api_url) {
            return Err(ConfigError::invalid(
                "github.api_url",
                format!(
                "github.api_url {:?} is not an https:// URL (for example https://api.github.com, \
                 or https://HOST/api/v3 for GitHub Enterprise; plain http only on 127.0.0.1 or localhost)",
                config.github.api_url
            )));
        }
        if let Some(url) = &config.public_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(ConfigError::invalid(
                    "public_url",
                    format!("public_url {url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if config.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "max_body_bytes",
                "max_body_bytes must be at least 1",
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

    #[test]
    fn the_state_dir_of_a_config_is_found_whatever_else_is_wrong_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hookci.yml");
        for (text, wanted) in [
            (
                "state_dir: /srv/ci\nno_such_key: 1\n",
                Some(PathBuf::from("/srv/ci")),
            ),
            ("state_dir: state\n", Some(dir.path().join("state"))),
            ("listen: 127.0.0.1:8080\n", None),
            ("state_dir: [\n", None),
        ] {
            std::fs::write(&file, text).unwrap();
            assert_eq!(state_dir_in(&file), wanted, "{text}");
        }
        assert_eq!(state_dir_in(&dir.path().join("missing.yml")), None);
    }

    struct FakeEnv(HashMap<&'static str, &'static str>);

    /// The keys a config section accepts, as its "unknown field" error lists them: the
    /// list serde itself checks against, so it cannot drift from the struct.
    fn keys_of<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
        let err = serde_yaml::from_str::<T>("zz-no-such-key: 1")
            .unwrap_err()
            .to_string();
        let list = err
            .split_once("expected one of ")
            .or_else(|| err.split_once("expected "))
            .map(|(_, list)| list)
            .unwrap_or_else(|| panic!("no key list in {err:?}"));
        list.split(", ")
            .map(|k| {
                k.split('`')
                    .nth(1)
                    .unwrap_or_else(|| panic!("{err:?}"))
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn every_config_key_is_documented_in_the_readme() {
        let readme = include_str!("../README.md");
        let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `")).collect();
        let row_of = |key: &str| {
            rows.iter()
                .find(|r| r.starts_with(&format!("| `{key}` |")))
                .copied()
        };
        let mut missing = Vec::new();
        for key in keys_of::<FileConfig>() {
            let nested = match key.as_str() {
                "retention" => keys_of::<FileRetention>(),
                "github" => keys_of::<FileGithub>(),
                _ => Vec::new(),
            };
            if nested.is_empty() {
                if row_of(&key).is_none() {
                    missing.push(key);
                }
                continue;
            }
            for inner in nested {
                // A row of its own (`github.api_url`), or named in its section's row.
                let own = row_of(&format!("{key}.{inner}")).is_some();
                let in_section = row_of(&key).is_some_and(|r| r.contains(&inner));
                if !own && !in_section {
                    missing.push(format!("{key}.{inner}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "config keys without a row in README's configuration table: {missing:?}"
        );
    }

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
    fn the_database_comes_from_the_file_then_the_environment_with_its_password_kept_out_of_sight() {
        let dir = tempfile::tempdir().unwrap();
        let creds = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db-password"), "file-pw\n").unwrap();
        std::fs::write(creds.path().join("database-password"), "creds-pw\n").unwrap();
        let creds_path: &'static str =
            Box::leak(creds.path().display().to_string().into_boxed_str());
        let build = |yaml: &str, env: &[(&'static str, &'static str)]| {
            let path = dir.path().join("hookci.yml");
            std::fs::write(&path, yaml).unwrap();
            let env = FakeEnv(env.iter().copied().collect());
            Config::build(FileConfig::load(&path).unwrap(), Overrides::default(), &env)
        };
        let password = |c: &Config| {
            let db = c.database.as_ref().unwrap();
            (db.shown().to_owned(), format!("{c:?}").contains("-pw"))
        };

        // Neither: SQLite.
        assert!(build("", &[]).unwrap().database.is_none());
        // The file's key wins over the environment.
        let env = [("HOOKCI_DATABASE_URL", "postgres://env@db/env")];
        let c = build("database: postgres://ci@db:5433/hookci\n", &env).unwrap();
        assert_eq!(password(&c), ("postgres://ci@db:5433/hookci".into(), false));
        let c = build("", &env).unwrap();
        assert_eq!(c.database.unwrap().shown(), "postgres://env@db:5432/env");
        // The password: its file, else systemd's credential; never shown.
        let c = build(
            "database: postgres://ci@db/hookci\ndatabase_password_file: db-password\n",
            &[("CREDENTIALS_DIRECTORY", creds_path)],
        )
        .unwrap();
        assert_eq!(password(&c), ("postgres://ci@db:5432/hookci".into(), false));
        assert_eq!(
            c.database.unwrap().config.get_password(),
            Some(&b"file-pw"[..])
        );
        let c = build(
            "database: postgres://ci@db/hookci\n",
            &[("CREDENTIALS_DIRECTORY", creds_path)],
        )
        .unwrap();
        assert_eq!(
            c.database.unwrap().config.get_password(),
            Some(&b"creds-pw"[..])
        );
        // A bad URL is refused, without repeating it.
        let err = build("database: postgres://ci:url-pw@db:port/hookci\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("database:") && !err.contains("url-pw"),
            "{err}"
        );
    }

    #[test]
    fn a_shared_database_needs_a_step_grace_within_a_third_of_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let build = |yaml: &str| {
            let path = dir.path().join("hookci.yml");
            std::fs::write(&path, yaml).unwrap();
            let env = FakeEnv(HashMap::new());
            Config::build(FileConfig::load(&path).unwrap(), Overrides::default(), &env)
        };
        let shared = "database: postgres://ci@db/hookci\n";
        // The defaults (5 s of 15 s) fit, and SQLite has no lease to keep.
        assert!(build(shared).is_ok());
        assert!(build("step_grace: 30s\nlease: 15s\n").is_ok());
        assert!(build(&format!("{shared}step_grace: 2s\nlease: 6s\n")).is_ok());
        let err = build(&format!("{shared}step_grace: 6s\nlease: 15s\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("step_grace") && err.contains("a third of lease"),
            "{err}"
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
    fn pipeline_secrets_from_the_environment_are_captured_once_at_load() {
        let env = FakeEnv(HashMap::from([
            ("HOOKCI_SECRET_DEPLOY", "from-env"),
            ("HOOKCI_WEBHOOK_SECRET", "daemon-only"),
            ("CREDENTIALS_DIRECTORY", "/run/credentials/hookci.service"),
        ]));
        let names = [
            "HOOKCI_SECRET_DEPLOY",
            "HOOKCI_WEBHOOK_SECRET",
            "CREDENTIALS_DIRECTORY",
        ];
        let c =
            Config::build_with(FileConfig::default(), Overrides::default(), &env, names).unwrap();
        let got = resolve_secret("DEPLOY", None, &c.secret_env).map(|s| s.expose().to_owned());
        assert_eq!(got.as_deref(), Ok("from-env"));
        // Only pipeline secrets are kept for steps; the daemon's own never are.
        assert_eq!(c.secret_env.var("HOOKCI_WEBHOOK_SECRET"), None);
        assert_eq!(
            c.secret_env.var("CREDENTIALS_DIRECTORY").as_deref(),
            Some("/run/credentials/hookci.service")
        );
        assert_eq!(
            c.protected,
            vec![PathBuf::from("/run/credentials/hookci.service")]
        );
        assert!(!format!("{c:?}").contains("from-env"), "Debug hides them");
    }

    #[test]
    fn the_github_token_belongs_to_the_git_host_of_the_api() {
        let host = |api_url: &str| {
            GithubConfig {
                token: None,
                api_url: api_url.to_owned(),
                statuses: true,
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
            ("http://127.0.0.1:9000", None),
            ("api.github.com", None),
            ("", None),
        ] {
            assert_eq!(host(api_url).as_deref(), git_host, "{api_url}");
        }
        let file = FileConfig {
            github: Some(FileGithub {
                api_url: Some("http://ghe.corp/api/v3".into()),
                ..FileGithub::default()
            }),
            ..FileConfig::default()
        };
        let err = Config::build(file, Overrides::default(), &FakeEnv(HashMap::new())).unwrap_err();
        assert!(err.to_string().contains("github.api_url"), "{err}");

        // A loopback fake of the API over plain http: the API client may use it, a
        // clone never offers the token to it.
        for url in ["http://127.0.0.1:9000", "http://localhost:8080/api/v3"] {
            assert!(api_url_ok(url), "{url}");
            let github = GithubConfig {
                token: Some(Secret::new("t0ken")),
                api_url: url.into(),
                statuses: true,
            };
            assert!(github.clone_token().is_none(), "{url}");
        }
        for url in ["http://10.0.0.1:9000", "http://ghe.corp", "ftp://127.0.0.1"] {
            assert!(!api_url_ok(url), "{url}");
        }
        let token = GithubConfig {
            token: Some(Secret::new("t0ken")),
            api_url: "https://api.github.com".into(),
            statuses: true,
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
    fn retention_keeps_at_least_one_run() {
        let keep_none = FileConfig {
            retention: Some(FileRetention {
                runs: Some(0),
                ..FileRetention::default()
            }),
            ..FileConfig::default()
        };
        let err =
            Config::build(keep_none, Overrides::default(), &FakeEnv(HashMap::new())).unwrap_err();
        assert!(err.to_string().contains("retention.runs"), "{err}");
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
        let limits = FileConfig {
            run_as: Some("65534:65534".into()),
            run_as_uids: Some("2000000000-2000000001".into()),
            max_connections: Some(7),
            max_body_bytes: Some(1024),
            ..FileConfig::default()
        };
        let new = Config::build(limits, Overrides::default(), &env).unwrap();
        assert_eq!(
            running.restart_only_changes(&new),
            ["run_as", "run_as_uids", "max_connections", "max_body_bytes"]
        );
        let swapped = new.with_restart_only_of(&running);
        assert_eq!(
            (
                swapped.run_as,
                swapped.run_as_uids,
                swapped.max_connections,
                swapped.max_body_bytes
            ),
            (None, None, running.max_connections, running.max_body_bytes)
        );
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
    fn a_value_checked_after_parsing_is_told_at_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hookci.yml");
        let env = FakeEnv(HashMap::new());
        let source = ConfigSource {
            path: Some(path.clone()),
            allow_unsigned: true,
            ..ConfigSource::default()
        };
        let missing = dir.path().join("no-such-secret");
        for (text, place, message) in [
            (
                "listen: 127.0.0.1:1\nmax_parallel_runs: 0\n".to_owned(),
                "2:1",
                "max_parallel_runs must be at least 1",
            ),
            (
                "retention:\n  days: 1\n  runs: 0\n".to_owned(),
                "3:3",
                "retention.runs must be at least 1",
            ),
            ("run_as: 0:0\n".to_owned(), "1:1", "must not run as root"),
            (
                "run_as_uids: 2000000000-2000000003\n".to_owned(),
                "1:1",
                "run_as_uids needs run_as",
            ),
            (
                "run_as: 64000:64000\nmax_parallel_runs: 3\nrun_as_uids: 2000000000-2000000001\n"
                    .to_owned(),
                "3:1",
                "holds 2 uids, fewer than max_parallel_runs (3)",
            ),
            (
                "run_as: 2000000001:64000\nrun_as_uids: 2000000000-2000000003\n".to_owned(),
                "2:1",
                "holds uid 2000000001, run_as's own",
            ),
            (
                "run_as: 64000:64000\nrun_as_uids: 2000000003-2000000000\n".to_owned(),
                "2:1",
                "the last uid is below the first",
            ),
            (
                format!("\nwebhook_secret_file: {}\n", missing.display()),
                "2:1",
                "cannot read webhook secret",
            ),
        ] {
            std::fs::write(&path, &text).unwrap();
            let told = source.describe(&source.load(&env).unwrap_err());
            let at = format!("{}:{place}: ", path.display());
            assert!(
                told.starts_with(&at) && told.contains(message),
                "{at} {message}: {told}"
            );
        }
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

    #[test]
    fn keep_alive_timeout_defaults_to_15s_and_must_be_more_than_0() {
        let env = FakeEnv(HashMap::new());
        let c = Config::build(FileConfig::default(), Overrides::default(), &env).unwrap();
        assert_eq!(c.keep_alive_timeout, Duration::from_secs(15));
        let zero = FileConfig {
            keep_alive_timeout: Some(Duration::ZERO),
            ..FileConfig::default()
        };
        let err = Config::build(zero, Overrides::default(), &env).unwrap_err();
        assert!(err.to_string().contains("keep_alive_timeout"), "{err}");
    }
}
