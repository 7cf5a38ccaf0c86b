//! The `hookci` command: parses flags, sets up logging, binds the listener and hands
//! over to the library (`daemon::run` and friends).

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hookci::config::{Config, ConfigError, ConfigSource, Overrides, ProcessEnv};
use hookci::pipeline::PipelineSet;
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "hookci",
    version,
    about = "Push-triggered CI pipelines from GitHub webhooks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// Config file (default: $HOOKCI_CONFIG, else none)
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Address to listen on (default 127.0.0.1:8080)
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Directory of pipeline files (default ./pipelines)
        #[arg(long, value_name = "DIR")]
        pipelines: Option<PathBuf>,
        /// State directory: database, mirrors, workspaces, logs (default ./.hookci)
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Accept unsigned webhooks when no secret is configured (for local trials only)
        #[arg(long)]
        allow_unsigned: bool,
    },
    /// Validate the config and every pipeline file; exit 1 on errors
    Check {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, value_name = "DIR")]
        pipelines: Option<PathBuf>,
    },
    /// Sign a payload file with the webhook secret and POST it, as GitHub would
    Send {
        /// The JSON payload; its bytes are sent and signed as they are
        payload: PathBuf,
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "push")]
        event: String,
        /// X-GitHub-Delivery (default: a fresh random id)
        #[arg(long)]
        delivery: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Run one pipeline now, in the foreground, on a repository path or URL
    Run {
        pipeline: String,
        /// A local repository path or a clone URL
        #[arg(long)]
        repo: String,
        /// Branch or tag (default: main)
        #[arg(long = "ref", default_value = "main")]
        git_ref: String,
        /// The commit (default: the ref's head)
        #[arg(long)]
        sha: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, value_name = "DIR")]
        pipelines: Option<PathBuf>,
    },
    /// Explain a delivery: for every pipeline, whether it ran and why (not)
    Why {
        delivery: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List runs, newest first
    Runs {
        #[arg(long)]
        pipeline: Option<String>,
        #[arg(long)]
        status: Option<String>,
        /// Only runs older than this run id (the next page of a listing)
        #[arg(long, value_name = "RUN")]
        before: Option<i64>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Print a run's log; -f follows it until the run ends
    Logs {
        run: i64,
        #[arg(short = 'f', long)]
        follow: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// One git job for the daemon: a request on stdin, the reply on stdout (internal)
    #[command(name = hookci::git::worker::SUBCOMMAND, hide = true)]
    GitWorker,
    /// Make the daemon read its config and pipelines again, all or nothing (needs the
    /// API token, or --local); exit 1 if the reload failed, with each problem printed
    Reload {
        /// Ask through the reload socket in the daemon's state directory instead of the
        /// HTTP API: no API token, as the daemon's user or root (the unit's ExecReload=)
        #[arg(long, conflicts_with = "url")]
        local: bool,
        /// With --local: the daemon's state directory (default: the config's
        /// state_dir, else $STATE_DIRECTORY, else ./.hookci)
        #[arg(long, value_name = "DIR", requires = "local")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Cancel a queued or running run (needs the API token)
    Cancel {
        run: i64,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Run a run's pipeline and commit again (needs the API token)
    Rerun {
        run: i64,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Run a pipeline now on a branch or tag (needs the API token)
    Trigger {
        pipeline: String,
        #[arg(long = "ref")]
        git_ref: String,
        /// The commit (default: the ref's current head on the remote)
        #[arg(long)]
        sha: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

/// Where the daemon's API is, and the token for its write calls.
#[derive(clap::Args)]
struct RemoteArgs {
    /// The daemon's base URL (default: http:// and the config's listen address)
    #[arg(long)]
    url: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
}

impl RemoteArgs {
    fn remote(&self) -> anyhow::Result<hookci::cli::remote::Remote> {
        let config = load_config(&self.config, Overrides::default())?;
        Ok(hookci::cli::remote::Remote::new(self.url.clone(), &config))
    }
}

fn config_source(args: &ConfigArgs, flags: Overrides) -> ConfigSource {
    ConfigSource {
        path: args
            .config
            .clone()
            .or_else(|| std::env::var_os("HOOKCI_CONFIG").map(PathBuf::from)),
        flags,
        allow_unsigned: true,
    }
}

/// A config problem at its place; one from the parser also shows its line and a caret.
fn config_error(source: &ConfigSource, error: ConfigError) -> anyhow::Error {
    match error {
        ConfigError::File(_) => error.into(),
        _ => anyhow::anyhow!(source.describe(&error)),
    }
}

fn load_config(args: &ConfigArgs, flags: Overrides) -> anyhow::Result<Config> {
    let source = config_source(args, flags);
    let config = source
        .load(&ProcessEnv)
        .map_err(|e| config_error(&source, e))?;
    // The config holds them now; nothing started from here on inherits one.
    hookci::config::scrub_environment();
    Ok(config)
}

fn load_pipelines(dir: &Path) -> Result<PipelineSet, ExitCode> {
    PipelineSet::load(dir).map_err(|errors| {
        for e in &errors {
            eprintln!("{e}");
        }
        eprintln!("{} error(s) in pipeline files", errors.len());
        ExitCode::from(1)
    })
}

fn random_delivery_id() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let h = hex::encode(bytes);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// The signals the daemon acts on, listened for from before recovery on: until then a
/// SIGTERM or a SIGHUP would find the default action (the end of the process, like a
/// crash) in place. SIGHUP asks for a reload (`daemon::run`).
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> std::io::Result<(Signals, Signal)> {
        let hup = signal(SignalKind::hangup())?;
        Ok((
            Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            },
            hup,
        ))
    }

    /// Resolves at the first SIGTERM or SIGINT.
    async fn stop(mut self) {
        let name = tokio::select! {
            Some(()) = self.term.recv() => "SIGTERM",
            Some(()) = self.int.recv() => "SIGINT",
            // The streams end only with the runtime, when nothing is left to stop.
            else => return std::future::pending().await,
        };
        tracing::info!("{name} received");
    }
}

fn serve(source: ConfigSource) -> anyhow::Result<ExitCode> {
    hookci::process::not_dumpable();
    hookci::process::raise_fd_limit();
    let config = source
        .load(&ProcessEnv)
        .map_err(|e| config_error(&source, e))?;
    // The config holds them now; nothing started from here on inherits one.
    hookci::config::scrub_environment();
    let pipelines = match load_pipelines(&config.pipelines) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    // Before the runtime's threads start: it edits the environment.
    let passed = hookci::systemd::listener().context("cannot use the socket systemd passed")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (signals, hangups) = Signals::install().context("cannot listen for signals")?;
        let listener = match passed {
            Some(socket) => {
                let listener = tokio::net::TcpListener::from_std(socket)
                    .context("cannot use the socket systemd passed")?;
                tracing::info!(
                    "serving on the socket systemd passed (socket activation); listen is not used"
                );
                listener
            }
            None => tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?,
        };
        if config.webhook_secret.is_none() {
            tracing::warn!("no webhook secret: accepting UNSIGNED webhooks (--allow-unsigned)");
        }
        hookci::daemon::run(listener, source, config, pipelines, signals.stop(), hangups).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOOKCI_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hookci: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            pipelines,
            state_dir,
            allow_unsigned,
        } => {
            let flags = Overrides {
                listen,
                pipelines,
                state_dir,
            };
            serve(ConfigSource {
                allow_unsigned,
                ..config_source(&config, flags)
            })
        }
        Command::Check { config, pipelines } => {
            let flags = Overrides {
                pipelines,
                ..Overrides::default()
            };
            let config = load_config(&config, flags)?;
            if let Some(warning) = hookci::daemon::warn_if_steps_run_as_root(&config) {
                eprintln!("warning: {warning}");
            }
            if config.github.status_token().is_some() && config.public_url.is_none() {
                eprintln!(
                    "warning: commit statuses are on (a GitHub token is set) but public_url is not: \
                     statuses will carry no link to their run"
                );
            }
            Ok(match load_pipelines(&config.pipelines) {
                Ok(set) => {
                    println!(
                        "ok: {} pipeline(s) in {}",
                        set.len(),
                        config.pipelines.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            })
        }
        Command::Send {
            payload,
            url,
            event,
            delivery,
            config,
        } => {
            let config = load_config(&config, Overrides::default())?;
            let body = std::fs::read(&payload)
                .with_context(|| format!("cannot read {}", payload.display()))?;
            let delivery = match delivery {
                Some(d) => d,
                None => random_delivery_id()?,
            };
            let signature = config
                .webhook_secret
                .as_ref()
                .map(|s| hookci::intake::sign(s.expose().as_bytes(), &body));
            let mut headers = vec![
                ("Content-Type", "application/json"),
                ("User-Agent", "hookci-send"),
                ("X-GitHub-Event", event.as_str()),
                ("X-GitHub-Delivery", delivery.as_str()),
            ];
            if let Some(sig) = &signature {
                headers.push(("X-Hub-Signature-256", sig.as_str()));
            }
            let response = hookci::cli::client::request("POST", &url, &headers, &body)?;
            println!("{} {}", response.status, response.text().trim_end());
            Ok(if response.status < 400 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Run {
            pipeline,
            repo,
            git_ref,
            sha,
            config,
            pipelines,
        } => {
            let flags = Overrides {
                pipelines,
                ..Overrides::default()
            };
            let config = load_config(&config, flags)?;
            let set = match load_pipelines(&config.pipelines) {
                Ok(set) => set,
                Err(code) => return Ok(code),
            };
            let req = hookci::cli::foreground::Request {
                pipeline,
                repo,
                git_ref,
                sha,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let status = runtime
                .block_on(hookci::cli::foreground::run(config, set, req))
                .map_err(anyhow::Error::msg)?;
            Ok(if status == hookci::store::RunStatus::Succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Why { delivery, remote } => Ok(ExitCode::from(remote.remote()?.why(&delivery)?)),
        Command::Runs {
            pipeline,
            status,
            before,
            limit,
            remote,
        } => Ok(ExitCode::from(remote.remote()?.runs(
            pipeline.as_deref(),
            status.as_deref(),
            before,
            limit,
        )?)),
        Command::Logs {
            run,
            follow,
            remote,
        } => Ok(ExitCode::from(remote.remote()?.logs(run, follow)?)),
        Command::GitWorker => Ok(hookci::git::worker::worker_main()),
        Command::Reload {
            local: true,
            state_dir,
            remote,
        } => {
            // Only `state_dir` from the config file: the reload is what reads the rest,
            // and a broken one is the daemon's to report.
            let configured = || {
                config_source(&remote.config, Overrides::default())
                    .path
                    .and_then(|path| hookci::config::state_dir_in(&path))
            };
            let dir = state_dir
                .or_else(configured)
                .or_else(|| {
                    std::env::var_os("STATE_DIRECTORY").map(|s| {
                        let s = s.to_string_lossy().into_owned();
                        PathBuf::from(s.split(':').next().unwrap_or(&s))
                    })
                })
                .unwrap_or_else(|| PathBuf::from("./.hookci"));
            Ok(ExitCode::from(hookci::cli::remote::reload_local(&dir)?))
        }
        Command::Reload { remote, .. } => Ok(ExitCode::from(remote.remote()?.reload()?)),
        Command::Cancel { run, remote } => Ok(ExitCode::from(remote.remote()?.cancel(run)?)),
        Command::Rerun { run, remote } => Ok(ExitCode::from(remote.remote()?.rerun(run)?)),
        Command::Trigger {
            pipeline,
            git_ref,
            sha,
            remote,
        } => Ok(ExitCode::from(remote.remote()?.trigger(
            &pipeline,
            &git_ref,
            sha.as_deref(),
        )?)),
    }
}
